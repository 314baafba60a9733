-- Claims read only what they may take.
--
-- `lane_behind`: a delivery of an ordered lane waits behind an earlier delivery of its lane
-- that is not final (pending, retrying, delivering, held). Set when the delivery is
-- written or replayed, cleared for the lane's next delivery when its head ends (see
-- src/store/lanes.rs). Claims read `deliveries_claimable`, which holds no row that waits
-- behind another: an ordered backlog costs a claim nothing.
ALTER TABLE deliveries ADD COLUMN lane_behind BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE deliveries c SET lane_behind = TRUE
WHERE c.ordering_key IS NOT NULL AND c.state IN ('pending', 'retrying', 'delivering', 'held')
  AND EXISTS (SELECT 1 FROM deliveries e WHERE e.namespace = c.namespace AND e.endpoint = c.endpoint
              AND e.ordering_key = c.ordering_key AND e.id < c.id
              AND e.state IN ('pending', 'retrying', 'delivering', 'held'));
DROP INDEX deliveries_due;
DROP INDEX deliveries_lanes;
-- Per endpoint, in due order: a claim takes at most an endpoint's free slots from here.
CREATE INDEX deliveries_claimable ON deliveries (namespace, endpoint, next_attempt_at, id)
    WHERE state IN ('pending', 'retrying') AND NOT lane_behind;
-- The open (not final) deliveries of each lane: its head is the first.
CREATE INDEX deliveries_lane_open ON deliveries (namespace, endpoint, ordering_key, id)
    WHERE ordering_key IS NOT NULL AND state IN ('pending', 'retrying', 'delivering', 'held');

-- The breaker's half-open probe, shared by every process: taken by a claim with a
-- conditional update (the claim's lease token, until its lease ends), cleared by the
-- probe's completion or release.
ALTER TABLE endpoint_state ADD COLUMN probe_token TEXT;
ALTER TABLE endpoint_state ADD COLUMN probe_until TIMESTAMPTZ;

-- Retries granted per endpoint in the last hour (`retriesPerHour`), shared by every process.
CREATE TABLE endpoint_retries (
    namespace TEXT NOT NULL,
    endpoint  TEXT NOT NULL,
    at        TIMESTAMPTZ NOT NULL
);
CREATE INDEX endpoint_retries_by_endpoint ON endpoint_retries (namespace, endpoint, at);
