-- One counter, bumped in the same transaction as every change to the resources (apply,
-- prune, delete). Ingest commits compare it with the revision their fan-out was decided
-- by, so an event accepted after an apply fans out by what that apply wrote, whichever
-- process accepted it.
CREATE TABLE resource_revision (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    revision BIGINT NOT NULL
);
INSERT INTO resource_revision (id, revision) VALUES (1, 0);
