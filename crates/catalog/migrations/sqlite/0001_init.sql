-- The catalog's first schema (SQLite). Times are UTC unix seconds (INTEGER):
-- compact, indexable and free of time-zone parsing on the hot listing path.

CREATE TABLE accounts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT    NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 100),
    created_at  INTEGER NOT NULL
);

-- A token is either a customer's (account_id set) or an admin's (is_admin = 1).
-- Only the SHA-256 of the token is kept; `prefix` (the first characters) lets
-- an operator tell tokens apart in `token list` without exposing them.
CREATE TABLE api_tokens (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    token_hash  BLOB    NOT NULL UNIQUE,
    prefix      TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    account_id  INTEGER REFERENCES accounts(id) ON DELETE CASCADE,
    is_admin    INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER,
    CHECK ((is_admin = 1 AND account_id IS NULL) OR (is_admin = 0 AND account_id IS NOT NULL))
);

-- Retention and backup window per plan (issue 4 schedules from these).
CREATE TABLE plans (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    name                TEXT    NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 100),
    retention_days      INTEGER NOT NULL CHECK (retention_days BETWEEN 7 AND 30),
    window_start_minute INTEGER NOT NULL DEFAULT 180 CHECK (window_start_minute BETWEEN 0 AND 1439),
    window_minutes      INTEGER NOT NULL DEFAULT 120 CHECK (window_minutes BETWEEN 1 AND 1440),
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL
);

INSERT INTO plans (name, retention_days, created_at, updated_at) VALUES
    ('basic', 7, unixepoch(), unixepoch()),
    ('standard', 14, unixepoch(), unixepoch()),
    ('premium', 30, unixepoch(), unixepoch());

-- `id` is the hosting provider's own server id, so API clients use the ids they know.
CREATE TABLE servers (
    id                  INTEGER PRIMARY KEY CHECK (id > 0),
    name                TEXT    NOT NULL CHECK (length(name) BETWEEN 1 AND 255),
    hostname            TEXT    NOT NULL DEFAULT '',
    account_id          INTEGER NOT NULL REFERENCES accounts(id),
    plan_id             INTEGER NOT NULL REFERENCES plans(id),
    auto_backup_enabled INTEGER NOT NULL DEFAULT 1,
    -- NULL: the plan's window applies.
    window_start_minute INTEGER CHECK (window_start_minute BETWEEN 0 AND 1439),
    -- NULL: the global hook from the config applies; '' disables it for this server.
    hook_pre_backup     TEXT,
    hook_post_backup    TEXT,
    hook_pre_restore    TEXT,
    hook_post_restore   TEXT,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL
);
CREATE INDEX servers_by_account ON servers (account_id, id);

CREATE TABLE server_disks (
    server_id INTEGER NOT NULL REFERENCES servers(id) ON DELETE CASCADE,
    idx       INTEGER NOT NULL CHECK (idx >= 0),
    path      TEXT    NOT NULL,
    PRIMARY KEY (server_id, idx)
);

-- account_id repeats the server's account so a tenant's listing and its
-- COUNT are answered from one index, without a join.
CREATE TABLE backups (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    server_id        INTEGER NOT NULL REFERENCES servers(id) ON DELETE CASCADE,
    account_id       INTEGER NOT NULL REFERENCES accounts(id),
    backup_type      TEXT    NOT NULL CHECK (backup_type IN ('manual', 'automatic')),
    status           TEXT    NOT NULL CHECK (status IN ('in_progress', 'completed', 'failed')),
    description      TEXT    NOT NULL DEFAULT '',
    created_at       INTEGER NOT NULL,
    expires_at       INTEGER,
    completed_at     INTEGER,
    size_mb          INTEGER,
    stored_bytes     INTEGER,
    progress         INTEGER NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    error            TEXT,
    engine_backup_id TEXT,
    -- Issue 4: the day an automatic backup was scheduled for (unix seconds of
    -- its slot), so there is one automatic backup per server per day.
    scheduled_for    INTEGER,
    verified_at      INTEGER,
    damaged          INTEGER NOT NULL DEFAULT 0,
    verify_error     TEXT
);
CREATE INDEX backups_by_server ON backups (server_id, backup_type, id);
CREATE INDEX backups_by_account ON backups (account_id, backup_type, id);
CREATE INDEX backups_by_type ON backups (backup_type, id);
CREATE INDEX backups_by_expiry ON backups (expires_at) WHERE expires_at IS NOT NULL;
CREATE UNIQUE INDEX backups_one_automatic_per_slot ON backups (server_id, scheduled_for)
    WHERE scheduled_for IS NOT NULL;

-- backup_id is not a foreign key: a restore keeps naming the backup it came
-- from after that backup is deleted.
CREATE TABLE restores (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    server_id    INTEGER NOT NULL REFERENCES servers(id) ON DELETE CASCADE,
    account_id   INTEGER NOT NULL REFERENCES accounts(id),
    backup_id    INTEGER NOT NULL,
    status       TEXT    NOT NULL CHECK (status IN ('in_progress', 'completed', 'failed')),
    progress     INTEGER NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    created_at   INTEGER NOT NULL,
    completed_at INTEGER,
    error        TEXT
);
CREATE INDEX restores_by_server ON restores (server_id, status);
CREATE INDEX restores_by_backup ON restores (backup_id, status);

-- The persistent work queue. A worker claims a queued job by setting
-- state = 'running', claimed_by and heartbeat_at in one UPDATE; a running job
-- whose heartbeat is older than the lease belongs to a dead worker and is
-- taken over (re-run from scratch) or failed once attempts are used up.
CREATE TABLE jobs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    kind         TEXT    NOT NULL,
    server_id    INTEGER REFERENCES servers(id) ON DELETE CASCADE,
    backup_id    INTEGER,
    restore_id   INTEGER,
    state        TEXT    NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL DEFAULT 3,
    claimed_by   TEXT,
    heartbeat_at INTEGER,
    run_after    INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    finished_at  INTEGER,
    error        TEXT
);
CREATE INDEX jobs_queue ON jobs (state, run_after, id);
CREATE INDEX jobs_by_server ON jobs (server_id, state);
CREATE INDEX jobs_by_backup ON jobs (backup_id);
