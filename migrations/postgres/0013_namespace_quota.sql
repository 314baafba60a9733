-- Ingest quotas shared by every process on this database (issue 16).
--
-- One token bucket per namespace with `spec.quotas.ingest`: `tokens_micro` millionths of a
-- token as of `refilled_at` (refilled at `perSecond` up to `burst` by whoever leases next),
-- and the events counted since `day_start` (the UTC midnight of the day counted) against
-- `perDay`. Processes lease tokens in batches with one UPDATE each; the row's lock
-- serializes them. SQLite (one process) keeps its buckets in memory: no table there.
CREATE TABLE namespace_quota (
    namespace    TEXT PRIMARY KEY,
    tokens_micro BIGINT NOT NULL,
    refilled_at  TIMESTAMPTZ NOT NULL,
    day_start    TIMESTAMPTZ NOT NULL,
    used_today   BIGINT NOT NULL
);
