-- 0002: the tier lease and the revision, so that writers outside the Redis tier and the tier
-- itself never silently overwrite each other (DESIGN.md 3.8).

-- hot_until: while it lies in the future the Redis tier may hold a copy of the session (set
-- by every warm, extended by every flush; a Redis copy never outlives it). A write that does
-- not go through the tier ('database' mode, an import in that mode) is refused meanwhile.
-- NULL: the tier has never held the session.
ALTER TABLE vel_sessions ADD COLUMN hot_until timestamptz;

-- revision grows with every change made outside the tier's flushes (a 'database'-mode write,
-- an expired session started afresh, an operator's resolution). A Redis copy remembers the
-- revision it was loaded at; a flush that finds another one is not applied but set aside as
-- a flush conflict, visible until resolved.
ALTER TABLE vel_sessions ADD COLUMN revision bigint NOT NULL DEFAULT 0 CHECK (revision >= 0);
