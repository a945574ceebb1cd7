-- What input preflight learned about each image URL that passed its checks, with the validators
-- the host gave (ETag, Last-Modified): within the check's time to live a run checks nothing again;
-- after it, a conditional request (304 when unchanged) revalidates cheaply. Failed checks are not
-- kept: a link that came back is noticed on the next run.
CREATE TABLE input_checks (
    url           TEXT    PRIMARY KEY,
    checked_at    INTEGER NOT NULL,  -- unix ms of the last check or revalidation
    etag          TEXT,
    last_modified TEXT,
    kind          TEXT    NOT NULL,  -- png, jpeg or webp, from the magic bytes
    bytes         INTEGER,           -- the whole file's size, when the host said
    width         INTEGER NOT NULL,
    height        INTEGER NOT NULL
) WITHOUT ROWID;

-- A digest of the validators (ETag, Last-Modified) of a job's input URLs when it was planned with
-- input checks on; NULL otherwise. A done row whose digest changes is re-run: its picture changed
-- under the same URL. NULL on either side compares as unchanged (checks were off).
ALTER TABLE jobs ADD COLUMN input_tag TEXT;
