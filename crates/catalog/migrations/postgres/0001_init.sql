-- The catalog's schema on PostgreSQL: the SQLite schema of migrations
-- 0001-0010 in one step, with the same tables, columns and meanings.
-- Times are UTC unix seconds (BIGINT), as on SQLite, so both backends share
-- one model and `catalog migrate` copies values unchanged. Every integer is
-- BIGINT (the model reads i64) and flags are BOOLEAN.

CREATE TABLE accounts (
    id             BIGSERIAL PRIMARY KEY,
    name           TEXT   NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 100),
    created_at     BIGINT NOT NULL,
    -- Webhooks: the secret is stored as given (the service signs with it).
    webhook_url    TEXT,
    webhook_secret TEXT
);

-- A token is either a customer's (account_id set) or an admin's (is_admin).
-- Only the SHA-256 of the token is kept.
CREATE TABLE api_tokens (
    id          BIGSERIAL PRIMARY KEY,
    token_hash  BYTEA   NOT NULL UNIQUE,
    prefix      TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    account_id  BIGINT  REFERENCES accounts(id) ON DELETE CASCADE,
    is_admin    BOOLEAN NOT NULL DEFAULT FALSE,
    created_at  BIGINT  NOT NULL,
    revoked_at  BIGINT,
    CHECK ((is_admin AND account_id IS NULL) OR (NOT is_admin AND account_id IS NOT NULL))
);

CREATE TABLE plans (
    id                  BIGSERIAL PRIMARY KEY,
    name                TEXT   NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 100),
    retention_days      BIGINT NOT NULL CHECK (retention_days BETWEEN 7 AND 30),
    window_start_minute BIGINT NOT NULL DEFAULT 180 CHECK (window_start_minute BETWEEN 0 AND 1439),
    window_minutes      BIGINT NOT NULL DEFAULT 120 CHECK (window_minutes BETWEEN 1 AND 1440),
    created_at          BIGINT NOT NULL,
    updated_at          BIGINT NOT NULL
);

INSERT INTO plans (name, retention_days, created_at, updated_at) VALUES
    ('basic', 7, extract(epoch FROM now())::BIGINT, extract(epoch FROM now())::BIGINT),
    ('standard', 14, extract(epoch FROM now())::BIGINT, extract(epoch FROM now())::BIGINT),
    ('premium', 30, extract(epoch FROM now())::BIGINT, extract(epoch FROM now())::BIGINT);

-- `id` is the hosting provider's own server id.
CREATE TABLE servers (
    id                  BIGINT  PRIMARY KEY CHECK (id > 0),
    name                TEXT    NOT NULL CHECK (length(name) BETWEEN 1 AND 255),
    hostname            TEXT    NOT NULL DEFAULT '',
    account_id          BIGINT  NOT NULL REFERENCES accounts(id),
    plan_id             BIGINT  NOT NULL REFERENCES plans(id),
    auto_backup_enabled BOOLEAN NOT NULL DEFAULT TRUE,
    -- NULL: the plan's window applies.
    window_start_minute BIGINT CHECK (window_start_minute BETWEEN 0 AND 1439),
    -- NULL: the global hook applies; '' disables it for this server.
    hook_pre_backup     TEXT,
    hook_post_backup    TEXT,
    hook_pre_restore    TEXT,
    hook_post_restore   TEXT,
    created_at          BIGINT  NOT NULL,
    updated_at          BIGINT  NOT NULL,
    -- How a server runs (see the SQLite migration 0008).
    runtime             TEXT    NOT NULL DEFAULT 'offline'
        CHECK (runtime IN ('offline', 'qemu', 'libvirt')),
    qmp_socket          TEXT,
    libvirt_domain      TEXT
);
CREATE INDEX servers_by_account ON servers (account_id, id);

-- Each disk's format is recorded when the server is added, never probed.
CREATE TABLE server_disks (
    server_id BIGINT NOT NULL REFERENCES servers(id) ON DELETE CASCADE,
    idx       BIGINT NOT NULL CHECK (idx >= 0),
    path      TEXT   NOT NULL,
    format    TEXT CHECK (format IN ('raw', 'qcow2', 'block')),
    PRIMARY KEY (server_id, idx)
);

CREATE TABLE backups (
    id               BIGSERIAL PRIMARY KEY,
    server_id        BIGINT  NOT NULL REFERENCES servers(id) ON DELETE CASCADE,
    account_id       BIGINT  NOT NULL REFERENCES accounts(id),
    backup_type      TEXT    NOT NULL CHECK (backup_type IN ('manual', 'automatic')),
    status           TEXT    NOT NULL CHECK (status IN ('in_progress', 'completed', 'failed')),
    description      TEXT    NOT NULL DEFAULT '',
    created_at       BIGINT  NOT NULL,
    expires_at       BIGINT,
    completed_at     BIGINT,
    size_mb          BIGINT,
    stored_bytes     BIGINT,
    progress         BIGINT  NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    error            TEXT,
    engine_backup_id TEXT,
    -- The day an automatic backup was scheduled for.
    scheduled_for    BIGINT,
    verified_at      BIGINT,
    damaged          BOOLEAN NOT NULL DEFAULT FALSE,
    verify_error     TEXT
);
CREATE INDEX backups_by_server ON backups (server_id, backup_type, id);
CREATE INDEX backups_by_account ON backups (account_id, backup_type, id);
CREATE INDEX backups_by_type ON backups (backup_type, id);
CREATE INDEX backups_by_expiry ON backups (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX backups_by_verified ON backups (status, verified_at);
CREATE INDEX backups_by_account_id ON backups (account_id, id);
CREATE INDEX backups_by_server_id ON backups (server_id, id);
-- One automatic backup per server per day, whichever replica's scheduler
-- creates it.
CREATE UNIQUE INDEX backups_one_automatic_per_slot ON backups (server_id, scheduled_for)
    WHERE scheduled_for IS NOT NULL;

-- backup_id is not a foreign key: a restore keeps naming its backup after
-- that backup is deleted.
CREATE TABLE restores (
    id           BIGSERIAL PRIMARY KEY,
    server_id    BIGINT NOT NULL REFERENCES servers(id) ON DELETE CASCADE,
    account_id   BIGINT NOT NULL REFERENCES accounts(id),
    backup_id    BIGINT NOT NULL,
    status       TEXT   NOT NULL CHECK (status IN ('in_progress', 'completed', 'failed')),
    progress     BIGINT NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    created_at   BIGINT NOT NULL,
    completed_at BIGINT,
    error        TEXT
);
CREATE INDEX restores_by_server ON restores (server_id, status);
CREATE INDEX restores_by_backup ON restores (backup_id, status);

-- The persistent work queue. Workers claim with `FOR UPDATE SKIP LOCKED`.
CREATE TABLE jobs (
    id           BIGSERIAL PRIMARY KEY,
    kind         TEXT   NOT NULL,
    server_id    BIGINT REFERENCES servers(id) ON DELETE CASCADE,
    backup_id    BIGINT,
    restore_id   BIGINT,
    state        TEXT   NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    attempts     BIGINT NOT NULL DEFAULT 0,
    max_attempts BIGINT NOT NULL DEFAULT 3,
    claimed_by   TEXT,
    heartbeat_at BIGINT,
    run_after    BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    finished_at  BIGINT,
    error        TEXT,
    -- The operator's detail of a failure, never shown by the API.
    error_detail TEXT
);
CREATE INDEX jobs_queue ON jobs (state, run_after, id);
CREATE INDEX jobs_by_server ON jobs (server_id, state);
CREATE INDEX jobs_by_backup ON jobs (backup_id);
-- One running job per server, even when workers of several processes claim
-- jobs of one server at the same instant: SQLite gets this from its single
-- writer, PostgreSQL from this index (a second claim fails and is retried).
CREATE UNIQUE INDEX jobs_one_running_per_server ON jobs (server_id) WHERE state = 'running';

-- When each periodic maintenance task last ran.
CREATE TABLE scheduler_tasks (
    name     TEXT   PRIMARY KEY,
    last_run BIGINT NOT NULL,
    summary  TEXT   NOT NULL DEFAULT ''
);

-- A list's `count` under any filter is a sum over these few rows, kept
-- exact by triggers in the transaction that inserts or deletes a backup.
CREATE TABLE backup_counts (
    server_id   BIGINT NOT NULL,
    backup_type TEXT   NOT NULL,
    account_id  BIGINT NOT NULL,
    n           BIGINT NOT NULL,
    PRIMARY KEY (server_id, backup_type)
);
CREATE INDEX backup_counts_by_account ON backup_counts (account_id);

CREATE FUNCTION backups_counted_on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO backup_counts (server_id, backup_type, account_id, n)
        VALUES (NEW.server_id, NEW.backup_type, NEW.account_id, 1)
        ON CONFLICT (server_id, backup_type) DO UPDATE SET n = backup_counts.n + 1;
    RETURN NULL;
END $$;
CREATE TRIGGER backups_counted_on_insert AFTER INSERT ON backups
    FOR EACH ROW EXECUTE FUNCTION backups_counted_on_insert();

CREATE FUNCTION backups_counted_on_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE backup_counts SET n = n - 1
        WHERE server_id = OLD.server_id AND backup_type = OLD.backup_type;
    RETURN NULL;
END $$;
CREATE TRIGGER backups_counted_on_delete AFTER DELETE ON backups
    FOR EACH ROW EXECUTE FUNCTION backups_counted_on_delete();

-- A server id can be reused for another account after a remove: its counts
-- go with it. (Its backups' cascaded deletes ran the trigger above first.)
CREATE FUNCTION backup_counts_follow_servers() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM backup_counts WHERE server_id = OLD.id;
    RETURN NULL;
END $$;
CREATE TRIGGER backup_counts_follow_servers AFTER DELETE ON servers
    FOR EACH ROW EXECUTE FUNCTION backup_counts_follow_servers();

-- The latest day an automatic backup was created for, per server.
CREATE TABLE auto_backup_slots (
    server_id BIGINT PRIMARY KEY REFERENCES servers(id) ON DELETE CASCADE,
    last_slot BIGINT NOT NULL
);

-- Idempotency keys of create requests: the primary key makes the first
-- request with a key the only one that claims it.
CREATE TABLE idempotency_keys (
    owner        TEXT   NOT NULL,
    idem_key     TEXT   NOT NULL,
    request_hash BYTEA  NOT NULL,
    status       BIGINT,
    body         BYTEA,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (owner, idem_key)
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);

-- The webhook outbox, written in the transaction that records an outcome.
-- `seq` is the creation order.
CREATE TABLE webhook_events (
    seq             BIGSERIAL PRIMARY KEY,
    id              TEXT   NOT NULL UNIQUE,
    account_id      BIGINT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    event           TEXT   NOT NULL,
    backup_id       BIGINT,
    restore_id      BIGINT,
    payload         TEXT,
    state           TEXT   NOT NULL DEFAULT 'pending',
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_error      TEXT,
    created_at      BIGINT NOT NULL,
    finished_at     BIGINT
);
CREATE INDEX webhook_events_pending ON webhook_events (account_id, seq) WHERE state = 'pending';
CREATE INDEX webhook_events_finished ON webhook_events (finished_at) WHERE state <> 'pending';
