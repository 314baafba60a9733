-- One delivery per (event, endpoint), written in the ingest transaction; its attempts.
CREATE TABLE deliveries (
    id              TEXT PRIMARY KEY,
    event_id        TEXT NOT NULL REFERENCES events (id),
    namespace       TEXT NOT NULL,
    endpoint        TEXT NOT NULL,
    -- pending | delivering | retrying | delivered | failed | dead | held | denied
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    -- attempts made before the last replay; the retry budget counts from here.
    attempt_base    INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL,
    lease_token     TEXT,
    lease_until     TIMESTAMPTZ,
    -- FIFO lane of an ordered endpoint; NULL when the endpoint is unordered.
    ordering_key    TEXT,
    last_status     INTEGER,
    last_error      TEXT,
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL,
    completed_at    TIMESTAMPTZ,
    UNIQUE (event_id, namespace, endpoint)
);
-- Due work, and work whose lease expired.
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE state IN ('pending', 'retrying');
CREATE INDEX deliveries_leased ON deliveries (lease_until) WHERE state = 'delivering';
CREATE INDEX deliveries_by_endpoint ON deliveries (namespace, endpoint, state, id);
CREATE INDEX deliveries_by_state ON deliveries (state, id);
CREATE INDEX deliveries_lanes ON deliveries (namespace, endpoint, ordering_key, id) WHERE ordering_key IS NOT NULL;

CREATE TABLE delivery_attempts (
    delivery_id TEXT NOT NULL REFERENCES deliveries (id),
    attempt     INTEGER NOT NULL,
    namespace   TEXT NOT NULL,
    endpoint    TEXT NOT NULL,
    started_at  TIMESTAMPTZ NOT NULL,
    duration_ms BIGINT NOT NULL,
    status      INTEGER,
    -- The first bytes of the response body.
    response    TEXT,
    error       TEXT,
    -- delivered | retry | failed | dead
    outcome     TEXT NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);
CREATE INDEX delivery_attempts_by_endpoint ON delivery_attempts (namespace, endpoint, started_at);

-- What the engine learns about an endpoint at run time.
CREATE TABLE endpoint_state (
    namespace            TEXT NOT NULL,
    name                 TEXT NOT NULL,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    breaker_open_until   TIMESTAMPTZ,
    last_success_at      TIMESTAMPTZ,
    -- Set when the receiver answered 410 Gone; cleared when the endpoint's spec changes.
    disabled_reason      TEXT,
    disabled_generation  BIGINT,
    PRIMARY KEY (namespace, name)
);
