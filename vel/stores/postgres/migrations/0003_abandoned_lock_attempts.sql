-- 0003: a lock attempt given up by its turn cannot take the lock when it arrives late.
--
-- A turn cancelled (or whose reply was lost) while taking its lock gives the attempt up by
-- leaving a tombstone: the row with its token, expired (vel/stores/postgres/locks.py,
-- _LOCK_ABANDON). The attempt itself may still reach Postgres afterwards, on the connection
-- the turn abandoned; it must then fail, or the lock would be held by nobody for a lease.
-- So an expired row is taken over by any token but its own, as _LOCK_ACQUIRE does.
CREATE OR REPLACE FUNCTION vel_turn_begin(p_session text, p_token text, p_lease float8, p_limit bigint)
RETURNS text[] LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO vel_locks AS l (session_id, token, expires_at)
    VALUES (p_session, p_token, now() + p_lease * interval '1 second')
    ON CONFLICT (session_id) DO UPDATE
       SET token = EXCLUDED.token, expires_at = EXCLUDED.expires_at
     WHERE l.expires_at < now() AND l.token <> EXCLUDED.token;
    IF NOT FOUND THEN
        RETURN NULL;
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
