-- Issue 4: when each periodic maintenance task (scheduled GC, the verify
-- pass) last ran, so a restart does not redo a weekly task at once and a
-- long downtime does not queue one run per missed period.
CREATE TABLE scheduler_tasks (
    name     TEXT    PRIMARY KEY,
    last_run INTEGER NOT NULL,
    -- A one-line summary of the last run (what GC freed, what verify found).
    summary  TEXT    NOT NULL DEFAULT ''
);

-- The verify pass picks the backups checked longest ago first.
CREATE INDEX backups_by_verified ON backups (status, verified_at);
