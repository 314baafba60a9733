-- Operational events (see src/operational.rs): written by the transaction of the transition
-- they tell of, with status 'outbox' (not yet fanned out); a fan-out step (any process)
-- gives them their deliveries by the catalog in force and sets 'accepted'.
--
-- `about_endpoint`: the endpoint an operational event is about, which never gets it (a
-- notification endpoint is not told about itself). NULL for every other event.
ALTER TABLE events ADD COLUMN about_endpoint TEXT;
-- The outbox: few rows, read oldest first.
CREATE INDEX events_outbox ON events (id) WHERE status = 'outbox';

-- `hookwarden.approval.expiring` was told for the request (once, by the leader).
ALTER TABLE approvals ADD COLUMN expiring_told BOOLEAN NOT NULL DEFAULT FALSE;

-- Why the endpoint's secret cannot be read, as the first process to find it said (its
-- `hookwarden.endpoint.secret_unavailable` was told); NULL once it can be read.
ALTER TABLE endpoint_state ADD COLUMN secret_unavailable TEXT;

-- An endpoint's dead letters of the last window, counted when more die
-- (`hookwarden.dead_letters.threshold`): read from the window, not every dead letter kept.
CREATE INDEX deliveries_dead_by_endpoint ON deliveries (namespace, endpoint, completed_at) WHERE state = 'dead';
