-- Spend windows kept incrementally: a decision sums its window's buckets, not the ledger
-- (see src/store/policy.rs).
--
-- `spend_ledger.bucket_end`: the end (milliseconds since the epoch) of the bucket the
-- entry's amount counts in. A bucket counts while its end is inside the window, so spend
-- leaves a window at most one bucket width late, never early. Entries written before this
-- migration are counted in 1-minute buckets.
ALTER TABLE spend_ledger ADD COLUMN bucket_end BIGINT NOT NULL DEFAULT 0;
UPDATE spend_ledger SET bucket_end = (floor(extract(epoch FROM created_at) / 60)::bigint + 1) * 60000;
ALTER TABLE spend_ledger ALTER COLUMN bucket_end DROP DEFAULT;
DROP INDEX spend_ledger_window;
CREATE INDEX spend_ledger_by_bucket ON spend_ledger (namespace, rule, spend_key, currency, bucket_end);

-- Per (namespace, rule, spend key, currency) and bucket: the sum of its reserved and
-- committed entries' amounts. Written in the transaction of every reservation and release.
CREATE TABLE spend_buckets (
    namespace  TEXT NOT NULL,
    rule       TEXT NOT NULL,
    spend_key  TEXT NOT NULL,
    currency   TEXT NOT NULL,
    bucket_end BIGINT NOT NULL,
    amount     BIGINT NOT NULL,
    PRIMARY KEY (namespace, rule, spend_key, currency, bucket_end)
);
INSERT INTO spend_buckets (namespace, rule, spend_key, currency, bucket_end, amount)
SELECT namespace, rule, spend_key, currency, bucket_end, SUM(amount) FROM spend_ledger
WHERE state IN ('reserved', 'committed')
GROUP BY namespace, rule, spend_key, currency, bucket_end;

-- Buckets ending at or before `counted_from` were pruned once they had left the window; a
-- window reaching further back (a rule's window made longer) rebuilds them from the
-- ledger. No row: nothing was pruned.
CREATE TABLE spend_windows (
    namespace    TEXT NOT NULL,
    rule         TEXT NOT NULL,
    spend_key    TEXT NOT NULL,
    currency     TEXT NOT NULL,
    counted_from BIGINT NOT NULL,
    PRIMARY KEY (namespace, rule, spend_key, currency)
);
