-- 0002: a locked turn in two round trips, with no durable commit of its own.
--
-- Lease rows need no crash durability: a lease is short and renewed, and a Postgres crash ends
-- every connection anyway (advisory locks, which vel_locks replaces, vanish the same way).
-- UNLOGGED, their inserts, renewals and deletes write no WAL, so committing them waits for no
-- disk flush; crash recovery empties the table, freeing every lease at once.
ALTER TABLE vel_locks SET UNLOGGED;

-- Takes the turn lock and reads the window in one call: NULL when another holder's lease is
-- still running, else the last p_limit messages (newest first; NULL limit: all). A function
-- because its read must see the turn that released the lock just before: in READ COMMITTED
-- each statement of a function takes a new snapshot, after the INSERT has waited for that
-- releasing transaction; one statement would read with a snapshot from before the wait.
-- Names resolve through the caller's search_path, like the rest of vel's SQL.
CREATE FUNCTION vel_turn_begin(p_session text, p_token text, p_lease float8, p_limit bigint)
RETURNS text[] LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO vel_locks AS l (session_id, token, expires_at)
    VALUES (p_session, p_token, now() + p_lease * interval '1 second')
    ON CONFLICT (session_id) DO UPDATE
       SET token = EXCLUDED.token, expires_at = EXCLUDED.expires_at
     WHERE l.expires_at < now();
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
