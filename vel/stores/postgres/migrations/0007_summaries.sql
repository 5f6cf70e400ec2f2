-- 0007: summaries of what falls out of a session's window (ContextManager(summarize=True)),
-- kept beside the messages, never instead of them.
--
-- A summary covers seqs 1..covered_seq and names the message id at covered_seq: it is served
-- only while that message is still the session's (a clear or replace gives new messages and
-- new ids), so a summary of an older history can never come back. The row also holds the
-- summarisation lease (one summariser per session across processes; a crashed one's lease
-- runs out) and what `vel stats` shows: the lag (messages older than the window not yet
-- covered, as last seen by a summariser), calls and failures.
--
-- A clear, a replace or the spec's DELETE through the vel_sessions view removes the messages
-- and leaves the session row (a tombstone): the summary then names a message that is gone,
-- is never served, and is deleted by the next read of it (vel/summaries/postgres.py). When
-- the row itself goes (purged), the summary goes with it.
CREATE TABLE vel_summaries (
    session_id  text        PRIMARY KEY REFERENCES vel_session_rows (id) ON DELETE CASCADE,
    summary     text,
    covered_seq bigint      NOT NULL DEFAULT 0 CHECK (covered_seq >= 0),
    covered_id  text,
    lag         bigint      NOT NULL DEFAULT 0,
    calls       bigint      NOT NULL DEFAULT 0,
    failures    bigint      NOT NULL DEFAULT 0,
    lease_token text,
    lease_until timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- `vel stats`: sessions whose summary is behind.
CREATE INDEX vel_summaries_lag_idx ON vel_summaries (lag) WHERE lag > 0;
