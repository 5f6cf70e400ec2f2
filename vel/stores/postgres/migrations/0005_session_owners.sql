-- 0005: sessions an app can organise: an owner, listings by activity, and the listing snapshot.
--
-- owner: the app's user or tenant (NULL: none). metadata (0001) becomes readable and writable
-- through vel's API; neither changes on an append.
ALTER TABLE vel_sessions ADD COLUMN owner text;

-- Listings walk (updated_at, id) in either direction with a keyset cursor, so a page costs the
-- same wherever it lies. This index replaces 0001's (updated_at) index, which cleanup queries
-- (the spec's DELETE ... WHERE updated_at < ...) use as well: the same number of index entries
-- per append as before.
CREATE INDEX vel_sessions_activity_idx ON vel_sessions (updated_at, id);
DROP INDEX vel_sessions_updated_at_idx;

-- One owner's sessions by activity (the chat sidebar). Partial: a session without an owner
-- costs no entry here, so apps that never set owners pay nothing per append for it.
CREATE INDEX vel_sessions_owner_activity_idx ON vel_sessions (owner, updated_at, id)
    WHERE owner IS NOT NULL;

-- Whether the row version written by transaction p_xmin (a row's xmin) was already committed
-- when the snapshot p_snap was taken: the pages after a listing's first show only sessions
-- unchanged since its snapshot (vel/stores/listing.py), so no session is listed twice. xmin
-- is a 32-bit xid; its epoch is the snapshot's (a row being read was written at most one
-- epoch before any snapshot still in use). Inlined by the planner (one SQL expression).
CREATE FUNCTION vel_unchanged_since(p_xmin xid, p_snap pg_snapshot)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT pg_visible_in_snapshot(
        ((((pg_snapshot_xmax(p_snap)::text::bigint >> 32) << 32) | p_xmin::text::bigint)
         - CASE WHEN (((pg_snapshot_xmax(p_snap)::text::bigint >> 32) << 32)
                      | p_xmin::text::bigint) > pg_snapshot_xmax(p_snap)::text::bigint
                THEN 4294967296 ELSE 0 END)::text::xid8,
        p_snap)
$$;
