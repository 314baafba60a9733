-- The policy gate: decisions on deliveries, spend reservations, approval requests and votes.
ALTER TABLE deliveries ADD COLUMN decision TEXT;
-- Granted by approvers: dispatched without being held again.
ALTER TABLE deliveries ADD COLUMN approved BOOLEAN NOT NULL DEFAULT FALSE;

CREATE TABLE spend_ledger (
    delivery_id TEXT NOT NULL REFERENCES deliveries (id),
    namespace   TEXT NOT NULL,
    rule        TEXT NOT NULL,
    -- The agent endpoint, plus the rule's `per` value when it has one.
    spend_key   TEXT NOT NULL,
    currency    TEXT NOT NULL,
    amount      BIGINT NOT NULL,
    -- reserved | committed | released
    state       TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (delivery_id, rule)
);
CREATE INDEX spend_ledger_window ON spend_ledger (namespace, rule, spend_key, currency, created_at);

CREATE TABLE approvals (
    id           TEXT PRIMARY KEY,
    namespace    TEXT NOT NULL,
    delivery_id  TEXT NOT NULL REFERENCES deliveries (id),
    event_id     TEXT NOT NULL,
    endpoint     TEXT NOT NULL,
    rule         TEXT,
    reason       TEXT NOT NULL,
    -- SHA-256 of the canonical event, endpoint and amounts: what a grant releases.
    action_hash  TEXT NOT NULL,
    role         TEXT NOT NULL,
    quorum       INTEGER NOT NULL,
    on_expiry    TEXT NOT NULL,
    expires_at   TIMESTAMPTZ NOT NULL,
    -- The subject that submitted the event: it may not approve.
    requested_by TEXT NOT NULL,
    -- pending | granted | denied | expired
    state        TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    decided_at   TIMESTAMPTZ,
    decided_reason TEXT
);
CREATE INDEX approvals_pending ON approvals (state, expires_at);
CREATE INDEX approvals_by_namespace ON approvals (namespace, state, id);

CREATE TABLE approval_votes (
    approval_id TEXT NOT NULL REFERENCES approvals (id),
    voter       TEXT NOT NULL,
    -- grant | deny
    vote        TEXT NOT NULL,
    reason      TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (approval_id, voter)
);
