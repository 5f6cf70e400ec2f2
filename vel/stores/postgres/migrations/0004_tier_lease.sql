-- 0004: the tier lease and the revision, so that writers outside the Redis tier and the tier
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

-- A 'database'-mode turn on a session the Redis tier holds is refused when it takes its lock,
-- before it calls the model (not at its commit): vel_turn_begin (0002, 0003) raises SQLSTATE
-- VL001, its DETAIL the lease's end in Unix seconds, and takes no lock (the exception undoes
-- the INSERT).
CREATE OR REPLACE FUNCTION vel_turn_begin(p_session text, p_token text, p_lease float8,
                                          p_limit bigint)
RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    held timestamptz;
BEGIN
    INSERT INTO vel_locks AS l (session_id, token, expires_at)
    VALUES (p_session, p_token, now() + p_lease * interval '1 second')
    ON CONFLICT (session_id) DO UPDATE
       SET token = EXCLUDED.token, expires_at = EXCLUDED.expires_at
     WHERE l.expires_at < now() AND l.token <> EXCLUDED.token;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT s.hot_until INTO held
      FROM vel_sessions s
     WHERE s.id = p_session AND s.hot_until > now()
       AND (s.expires_at IS NULL OR s.expires_at > now());
    IF held IS NOT NULL THEN
        RAISE EXCEPTION 'session % is held by the Redis tier', p_session
              USING ERRCODE = 'VL001', DETAIL = extract(epoch FROM held)::text;
    END IF;
    RETURN ARRAY(
        SELECT m.message::text
          FROM vel_messages m
         WHERE m.session_id = p_session
           AND EXISTS (SELECT 1 FROM vel_sessions s
                        WHERE s.id = p_session AND s.last_seq > 0
                          AND (s.expires_at IS NULL OR s.expires_at > now()))
         ORDER BY m.seq DESC
         LIMIT p_limit);
END
$$;
