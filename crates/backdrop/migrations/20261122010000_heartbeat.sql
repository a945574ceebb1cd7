-- One row the state writer bumps when it must make earlier commits power-safe and has no change
-- of its own to carry the fsync (see store::pipeline, "Durability").
CREATE TABLE heartbeat (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    beats INTEGER NOT NULL
);
INSERT INTO heartbeat (id, beats) VALUES (1, 0);
