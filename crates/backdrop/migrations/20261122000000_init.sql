-- backdrop state store: one row per run, per job (catalog row), per HTTP submission, per output file.
-- Times are unix milliseconds (UTC). Money is kept in the provider's unit (seedance credits, fal dollars)
-- and converted for display only.

CREATE TABLE runs (
    id           INTEGER PRIMARY KEY,
    started_at   INTEGER NOT NULL,
    ended_at     INTEGER,
    catalog      TEXT    NOT NULL,
    provider     TEXT    NOT NULL,
    model        TEXT    NOT NULL,
    dry_run      INTEGER NOT NULL DEFAULT 0,
    -- done | rows_failed | out_of_credits | budget | key_rejected | interrupted | fatal
    outcome      TEXT,
    exit_code    INTEGER,
    summary      TEXT    -- JSON RunSummary, written at the end of the run
);

CREATE TABLE jobs (
    id              INTEGER PRIMARY KEY,
    sku             TEXT    NOT NULL UNIQUE,
    -- catalog order of the last plan (CSV line or SQLite rowid); the pipeline claims in this order
    position        INTEGER NOT NULL,
    -- the run whose plan last saw this row; the pipeline only claims rows of its own plan
    planned_run     INTEGER REFERENCES runs(id),
    fingerprint     TEXT    NOT NULL,
    provider        TEXT    NOT NULL,
    model           TEXT    NOT NULL,
    task            TEXT    NOT NULL CHECK (task IN ('edit', 'generate')),
    prompt          TEXT    NOT NULL,
    inputs          TEXT    NOT NULL,  -- JSON array of image references (http(s) URL or local path)
    params          TEXT    NOT NULL,  -- JSON object: num_images, output_format, size, seed, ...
    state           TEXT    NOT NULL DEFAULT 'pending' CHECK (state IN
                        ('pending', 'submitting', 'submitted', 'fetching', 'done', 'waiting', 'failed', 'ambiguous')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER,
    request_id      TEXT,
    status_url      TEXT,
    response_url    TEXT,
    cancel_url      TEXT,
    result          TEXT,              -- JSON: the provider's output (image URLs) kept for re-download
    credits         REAL    NOT NULL DEFAULT 0,  -- charged for this row so far, all attempts
    error           TEXT,
    error_class     TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX jobs_by_state ON jobs (state, position);
CREATE INDEX jobs_by_plan ON jobs (planned_run, state, position);

CREATE TABLE attempts (
    id           INTEGER PRIMARY KEY,
    job_id       INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    run_id       INTEGER REFERENCES runs(id),
    number       INTEGER NOT NULL,
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER,
    request_id   TEXT,
    status_code  INTEGER,
    error_class  TEXT,   -- retry | fail | stop | ambiguous
    error        TEXT,
    latency_ms   INTEGER,
    credits      REAL
);
CREATE INDEX attempts_by_job ON attempts (job_id, number);

CREATE TABLE outputs (
    id            INTEGER PRIMARY KEY,
    job_id        INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx           INTEGER NOT NULL,
    path          TEXT    NOT NULL,
    sha256        TEXT    NOT NULL,
    bytes         INTEGER NOT NULL,
    width         INTEGER NOT NULL,
    height        INTEGER NOT NULL,
    content_type  TEXT    NOT NULL,
    source_url    TEXT    NOT NULL,
    UNIQUE (job_id, idx)
);
