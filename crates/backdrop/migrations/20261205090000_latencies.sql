-- Generation times this state file has seen (submit to completion, in ms), so that a run's first
-- polls go where earlier runs' jobs finished instead of guessing. Kept small: each run appends what
-- it learned, and only the most recent ones per provider are read back.
CREATE TABLE latencies (
    id          INTEGER PRIMARY KEY,
    run_id      INTEGER NOT NULL,
    provider    TEXT NOT NULL,
    model       TEXT NOT NULL,
    latency_ms  INTEGER NOT NULL
);
CREATE INDEX latencies_provider ON latencies (provider, id);
