-- The CloudEvents context attributes an event came with beyond those Hookwarden keeps in
-- columns of its own: `dataschema` and extension attributes, as a JSON object of strings,
-- numbers and booleans (NULL when there are none). Sent back as `ce-` headers to
-- endpoints with `format: cloudevents` (see src/cloudevents.rs).
ALTER TABLE events ADD COLUMN attributes TEXT;
