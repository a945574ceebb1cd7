-- Derived files made from each output by the template's `[export.NAME]` presets: one row per job,
-- output index and preset. `recipe` is the sha256 of the preset's settings, so a changed preset is
-- made again; `source_sha256` is the original it was made from.
CREATE TABLE exports (
    job_id        INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx           INTEGER NOT NULL,
    preset        TEXT    NOT NULL,
    path          TEXT    NOT NULL,
    sha256        TEXT    NOT NULL,
    bytes         INTEGER NOT NULL,
    width         INTEGER NOT NULL,
    height        INTEGER NOT NULL,
    content_type  TEXT    NOT NULL,
    recipe        TEXT    NOT NULL,
    source_sha256 TEXT    NOT NULL,
    PRIMARY KEY (job_id, idx, preset)
);

-- An export belongs to its original: whatever removes an output row (a new result, a retry, a
-- re-plan) removes its exports with it.
CREATE TRIGGER exports_follow_outputs AFTER DELETE ON outputs
BEGIN
    DELETE FROM exports WHERE job_id = OLD.job_id AND idx = OLD.idx;
END;

-- The presets and output folder of the latest run with a local output folder, so that
-- `backdrop accept` makes a reviewed row's exports as that run would have.
CREATE TABLE export_settings (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    out_dir TEXT    NOT NULL,
    presets TEXT    NOT NULL
);
