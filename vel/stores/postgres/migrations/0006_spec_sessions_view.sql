-- 0006: the spec's vel_sessions, as documented: (id, context jsonb, created_at, updated_at,
-- expires_at), so that the spec's SQL runs as written:
--
--     SELECT id, context FROM vel_sessions WHERE id = $1;
--     DELETE FROM vel_sessions WHERE updated_at < NOW() - INTERVAL '7 days';
--
-- The history stays in vel_messages (one row per message, appended without rewriting
-- anything); the session rows move to vel_session_rows, and vel_sessions becomes a view over
-- both whose writes INSTEAD OF triggers carry out. vel's own code reads and writes the base
-- tables, so an append costs exactly what it did.
--
-- Upgrading across this migration: stop every vel process of the schema first (workers,
-- flushers), run `vel migrate`, then start the new version. An older vel writes
-- `INSERT INTO vel_sessions ... ON CONFLICT`, which a view refuses.
ALTER TABLE vel_sessions RENAME TO vel_session_rows;

-- The view's columns: the spec's five, then vel's own (read-only but for owner and metadata).
-- Sessions without messages (a cleared session's row, kept an hour for its generation) are
-- not sessions to the spec's reader and are left out.
CREATE VIEW vel_sessions AS
SELECT s.id,
       COALESCE((SELECT jsonb_agg(m.message ORDER BY m.seq)
                   FROM vel_messages m
                  WHERE m.session_id = s.id), '[]'::jsonb) AS context,
       s.created_at,
       s.updated_at,
       s.expires_at,
       s.owner,
       s.metadata,
       s.last_seq AS message_count
  FROM vel_session_rows s
 WHERE s.last_seq > 0;

ALTER VIEW vel_sessions ALTER COLUMN created_at SET DEFAULT now();
ALTER VIEW vel_sessions ALTER COLUMN updated_at SET DEFAULT now();
ALTER VIEW vel_sessions ALTER COLUMN metadata SET DEFAULT '{}';

-- Writes through the view follow vel's rules for writers outside the Redis tier (DESIGN.md
-- 3.5 and 3.8): each one takes the session row's lock; a new history (INSERT, or UPDATE of
-- context) moves the generation and the revision on, so no flush that began before can
-- write the old history back, and is refused (SQLSTATE VL001) while the Redis tier holds the
-- session, as 'database'-mode writes are. A DELETE leaves the row a tombstone without its
-- owner and metadata (generation and revision moved on; purged an hour later), which a late
-- flush cannot bring back: it finds a newer generation and is set aside, never written. A
-- Redis copy of a deleted session is dropped by the two-tier purge (`vel sessions purge`) or
-- found gone when its tier lease ends.
CREATE FUNCTION vel_sessions_write() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    cur vel_session_rows%ROWTYPE;
    n bigint;
BEGIN
    IF TG_OP = 'DELETE' THEN
        UPDATE vel_session_rows s
           SET last_seq = 0, generation = s.generation + 1, revision = s.revision + 1,
               owner = NULL, metadata = '{}', updated_at = now()
         WHERE s.id = OLD.id AND s.last_seq > 0;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
        DELETE FROM vel_messages WHERE session_id = OLD.id;
        RETURN OLD;
    END IF;

    IF TG_OP = 'UPDATE' THEN
        IF NEW.id IS DISTINCT FROM OLD.id OR NEW.message_count IS DISTINCT FROM OLD.message_count
        THEN
            RAISE EXCEPTION 'vel_sessions: id and message_count cannot be set'
                  USING ERRCODE = '0A000';
        END IF;
        IF NEW.context IS NOT DISTINCT FROM OLD.context THEN
            UPDATE vel_session_rows
               SET created_at = NEW.created_at, updated_at = NEW.updated_at,
                   expires_at = NEW.expires_at, owner = NEW.owner,
                   metadata = coalesce(NEW.metadata, '{}')
             WHERE id = OLD.id;
            RETURN NEW;
        END IF;
    END IF;

    -- A new history: a JSON array of message objects.
    IF jsonb_typeof(NEW.context) IS DISTINCT FROM 'array'
       OR EXISTS (SELECT 1 FROM jsonb_array_elements(NEW.context) e
                   WHERE jsonb_typeof(e) <> 'object') THEN
        RAISE EXCEPTION 'vel_sessions.context must be a JSON array of message objects'
              USING ERRCODE = '22023';
    END IF;
    n := jsonb_array_length(NEW.context);
    INSERT INTO vel_session_rows AS s (id) VALUES (NEW.id) ON CONFLICT (id) DO NOTHING;
    SELECT * INTO cur FROM vel_session_rows s WHERE s.id = NEW.id FOR UPDATE;
    IF cur.hot_until > now() AND coalesce(cur.expires_at > now(), true) THEN
        RAISE EXCEPTION 'session % is held by the Redis tier', NEW.id
              USING ERRCODE = 'VL001', DETAIL = extract(epoch FROM cur.hot_until)::text;
    END IF;
    IF TG_OP = 'INSERT' AND cur.last_seq > 0 AND coalesce(cur.expires_at > now(), true) THEN
        RAISE EXCEPTION 'duplicate key value violates unique constraint "vel_sessions_pkey"'
              USING ERRCODE = '23505', DETAIL = format('Key (id)=(%s) already exists.', NEW.id);
    END IF;
    DELETE FROM vel_messages WHERE session_id = NEW.id;
    INSERT INTO vel_messages (session_id, seq, message_id, message)
    SELECT NEW.id, e.ord, 'sql-' || gen_random_uuid()::text, e.message
      FROM jsonb_array_elements(NEW.context) WITH ORDINALITY AS e (message, ord);
    UPDATE vel_session_rows s
       SET last_seq = n, generation = s.generation + 1, revision = s.revision + 1,
           created_at = CASE WHEN TG_OP = 'INSERT' OR s.last_seq = 0
                             THEN coalesce(NEW.created_at, now()) ELSE NEW.created_at END,
           updated_at = now(),
           expires_at = NEW.expires_at,
           owner = NEW.owner,
           metadata = coalesce(NEW.metadata, '{}')
     WHERE s.id = NEW.id;
    RETURN NEW;
END
$$;

CREATE TRIGGER vel_sessions_write INSTEAD OF INSERT OR UPDATE OR DELETE ON vel_sessions
    FOR EACH ROW EXECUTE FUNCTION vel_sessions_write();

-- The turn lock's function (0004) reads the session rows under their new name.
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
      FROM vel_session_rows s
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
           AND EXISTS (SELECT 1 FROM vel_session_rows s
                        WHERE s.id = p_session AND s.last_seq > 0
                          AND (s.expires_at IS NULL OR s.expires_at > now()))
         ORDER BY m.seq DESC
         LIMIT p_limit);
END
$$;
