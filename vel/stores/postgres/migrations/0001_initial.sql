-- 0001: sessions, their messages, the spec's one-document view, and turn-lock leases.
-- Applied by vel.stores.migrate inside one transaction; vel_schema_version is created by the
-- migrator itself because it must exist before any numbered migration can be recorded.

-- One row per session. last_seq is the seq of the newest message (0 = no messages: a fresh or
-- cleared session, kept as a tombstone so its generation survives). generation grows on every
-- clear/replace so that a write-behind flush that started earlier can be recognised as stale.
CREATE TABLE vel_sessions (
    id          text        PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    last_seq    bigint      NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
    generation  bigint      NOT NULL DEFAULT 0 CHECK (generation >= 0),
    metadata    jsonb       NOT NULL DEFAULT '{}'
);

-- list_sessions(inactive_for=...) and the spec's cleanup DELETE filter on updated_at.
CREATE INDEX vel_sessions_updated_at_idx ON vel_sessions (updated_at);
-- purge_expired scans only sessions that can expire.
CREATE INDEX vel_sessions_expires_at_idx ON vel_sessions (expires_at)
    WHERE expires_at IS NOT NULL;

-- Append-only history: seqs are 1..last_seq without gaps. The primary key serves windowed
-- reads (ORDER BY seq DESC LIMIT n) and the cascade from vel_sessions; the message id makes
-- every write replayable.
CREATE TABLE vel_messages (
    session_id  text        NOT NULL REFERENCES vel_sessions (id) ON DELETE CASCADE,
    seq         bigint      NOT NULL CHECK (seq > 0),
    message_id  text        NOT NULL,
    message     jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT vel_messages_pkey PRIMARY KEY (session_id, seq),
    CONSTRAINT vel_messages_message_id_key UNIQUE (session_id, message_id)
);

-- The spec documents vel_sessions(id, context jsonb, ...): this view gives that shape.
CREATE VIEW vel_session_contexts AS
SELECT s.id,
       COALESCE(
           (SELECT jsonb_agg(m.message ORDER BY m.seq)
              FROM vel_messages m
             WHERE m.session_id = s.id),
           '[]'::jsonb
       ) AS context,
       s.created_at,
       s.updated_at,
       s.expires_at
  FROM vel_sessions s;

-- Turn locks are lease rows rather than advisory locks: no connection stays pinned for a whole
-- LLM turn, they work behind transaction-pooling proxies, and a crashed holder's lease runs out.
CREATE TABLE vel_locks (
    session_id  text        PRIMARY KEY,
    token       text        NOT NULL,
    expires_at  timestamptz NOT NULL
);
