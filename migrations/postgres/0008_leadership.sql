-- The leader's term. Each new leader bumps `epoch` in the statement that starts its term
-- (on the connection holding the leader lock); every leader-only write (status, checkpoints,
-- the watched directory, approval expiry) reads it with FOR SHARE in its own transaction
-- and is refused unless it is still the writer's epoch. A stale leader cannot write, and a
-- new term cannot begin while a write of the old one is in flight.
CREATE TABLE leadership (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    epoch  BIGINT NOT NULL,
    holder TEXT,
    since  TIMESTAMPTZ
);
INSERT INTO leadership (id, epoch) VALUES (1, 0);
