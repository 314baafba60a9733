-- The leader's term (see the PostgreSQL migration). On SQLite one process leads; it bumps
-- `epoch` at start-up and its leader-only writes check it like PostgreSQL's do.
CREATE TABLE leadership (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    epoch  BIGINT NOT NULL,
    holder TEXT,
    since  TEXT
);
INSERT INTO leadership (id, epoch) VALUES (1, 0);
