-- `retry --review`: a row the quality gate held is generated again with another seed. seed_override
-- is the seed its next request uses instead of the template's (NULL: the template's); a plan that
-- resets the row (changed, forced) clears it. review_retries records each such re-queue: the seeds,
-- the paid request it replaces, the verdict that held it, and where that request's outputs were moved aside (JSON list of
-- {index, path, kept_as, sha256}), so the old, paid files are never lost or overwritten.
ALTER TABLE jobs ADD COLUMN seed_override INTEGER;
CREATE TABLE review_retries (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    retry INTEGER NOT NULL,
    old_seed INTEGER,
    new_seed INTEGER NOT NULL,
    old_request_id TEXT,
    kept TEXT NOT NULL,
    quality TEXT,
    created_at INTEGER NOT NULL,
    UNIQUE (job_id, retry)
);
