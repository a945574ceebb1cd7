-- The quality gate's verdicts, per output (JSON: every check's score, a reason per flag). The state
-- `review` itself needs the jobs table's CHECK constraint rebuilt, which SQLite can only do with
-- foreign keys off, outside a migration's transaction: `Store::open` does that step.
ALTER TABLE jobs ADD COLUMN quality TEXT;
