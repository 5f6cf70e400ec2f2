-- 0008: a turn waiting for a session's lock is handed it when it is released, instead of
-- polling for it with backoff (vel/stores/postgres/handoff.py).
--
-- waited: some turn is waiting for this lease. A failed attempt sets it (vel_turn_begin
-- below), and so does a turn that takes the lock while more turns of its process queue behind
-- it. A release of a lease with waited set sends NOTIFY vel_turn_lock with the session id as
-- payload in its own transaction, so waiters listening on the channel try again as soon as the
-- release is committed. Releases of uncontended leases notify nothing (a NOTIFY serialises
-- the commits that send one).
ALTER TABLE vel_locks ADD COLUMN waited boolean NOT NULL DEFAULT false;

-- As 0006's, plus p_queued (the caller's process has more turns waiting for this session),
-- the waiter's mark, and a cheaper common case: releases now keep the lease row (expired at
-- -infinity: free for any token) instead of deleting it, so taking a lock is mostly an UPDATE
-- of a row that exists (a heap-only update of an UNLOGGED row), not an insert and a delete
-- per turn that churn the table and its index. Rows of idle sessions are purged an hour after
-- their release as before (maintenance.py).
-- A failed attempt marks the lease it found held; if that lease was released in the meantime
-- (the UPDATE waits for the releasing transaction, then finds the row gone or free), it tries
-- again, so a mark never lands on a lease whose release has already notified. The 4-argument
-- version is replaced: calls without p_queued still work.
DROP FUNCTION vel_turn_begin(text, text, float8, bigint);
CREATE FUNCTION vel_turn_begin(p_session text, p_token text, p_lease float8, p_limit bigint,
                               p_queued boolean DEFAULT false)
RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    held timestamptz;
    last bigint;
    expiry timestamptz;
BEGIN
    -- The common case first: the session's lease row exists and is free (releases keep the
    -- row, expired, so this is an UPDATE in place: no index entry, no speculative insert).
    UPDATE vel_locks l
       SET token = p_token, expires_at = now() + p_lease * interval '1 second', waited = p_queued
     WHERE l.session_id = p_session AND l.expires_at < now() AND l.token <> p_token;
    IF NOT FOUND THEN  -- no row yet, or held
        LOOP
            INSERT INTO vel_locks AS l (session_id, token, expires_at, waited)
            VALUES (p_session, p_token, now() + p_lease * interval '1 second', p_queued)
            ON CONFLICT (session_id) DO UPDATE
               SET token = EXCLUDED.token, expires_at = EXCLUDED.expires_at,
                   waited = EXCLUDED.waited
             WHERE l.expires_at < now() AND l.token <> EXCLUDED.token;
            EXIT WHEN FOUND;
            UPDATE vel_locks l SET waited = true
             WHERE l.session_id = p_session
               AND NOT (l.expires_at < now() AND l.token <> p_token);
            IF FOUND THEN
                RETURN NULL;
            END IF;
        END LOOP;
    END IF;
    -- The session row once (0006 looked it up twice): the tier lease, then whether there is
    -- a live history to read.
    SELECT s.hot_until, s.last_seq, s.expires_at INTO held, last, expiry
      FROM vel_session_rows s
     WHERE s.id = p_session;
    IF held > now() AND (expiry IS NULL OR expiry > now()) THEN
        RAISE EXCEPTION 'session % is held by the Redis tier', p_session
              USING ERRCODE = 'VL001', DETAIL = extract(epoch FROM held)::text;
    END IF;
    IF last IS NULL OR last = 0 OR expiry <= now() THEN
        RETURN '{}';
    END IF;
    RETURN ARRAY(
        SELECT m.message::text
          FROM vel_messages m
         WHERE m.session_id = p_session
         ORDER BY m.seq DESC
         LIMIT p_limit);
END
$$;
