-- The hash-chained audit log: one chain per namespace (and _cluster), seq gapless in each.
CREATE TABLE audit_records (
    chain     TEXT NOT NULL,
    seq       BIGINT NOT NULL,
    time      TEXT NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    subject   TEXT NOT NULL,
    -- The record's data as JSON text.
    data      TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL,
    PRIMARY KEY (chain, seq)
);

-- Signed checkpoints (C2SP signed notes) over (chain, seq, hash).
CREATE TABLE audit_checkpoints (
    chain      TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    hash       TEXT NOT NULL,
    note       TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (chain, seq)
);

-- Each chain's last record, kept with every append: reading a head never scans a chain.
CREATE TABLE audit_heads (
    chain TEXT PRIMARY KEY,
    seq   BIGINT NOT NULL,
    hash  TEXT NOT NULL
);
