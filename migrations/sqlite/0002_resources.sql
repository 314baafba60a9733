-- Declarative resources (Endpoint, RetryBudget, Filter, AgentRule) as applied.
CREATE TABLE resources (
    kind        TEXT NOT NULL,
    namespace   TEXT NOT NULL,
    name        TEXT NOT NULL,
    uid         TEXT NOT NULL,
    -- Bumped only when spec changes.
    generation  BIGINT NOT NULL,
    labels      TEXT NOT NULL,
    annotations TEXT NOT NULL,
    -- Canonical JSON of the validated spec (sorted keys), compared byte for byte.
    spec        TEXT NOT NULL,
    -- The apply set that owns the resource; prune only ever deletes within one set.
    applyset    TEXT,
    -- Written by the controller: observedGeneration and conditions.
    status      TEXT,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (kind, namespace, name)
);
CREATE INDEX resources_by_applyset ON resources (applyset);
CREATE INDEX resources_by_namespace ON resources (namespace, kind);
