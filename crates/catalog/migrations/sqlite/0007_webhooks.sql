-- Webhooks: each account may have one endpoint, set by the provider. The
-- secret is stored as given (not hashed): the service must be able to sign
-- with it.
ALTER TABLE accounts ADD COLUMN webhook_url TEXT;
ALTER TABLE accounts ADD COLUMN webhook_secret TEXT;

-- The outbox. A row is written in the transaction that records a job's
-- outcome (finish_job, recover_stale_jobs) or first marks a backup damaged
-- (record_verification), only for accounts with a
-- webhook, so an event exists iff the outcome does. `seq` is the creation
-- order: an account's events go out one at a time, oldest first. `payload`
-- is the body, frozen at the first attempt so retries send the same bytes.
-- `state`: 'pending', then 'delivered' or 'failed' (attempts used up).
CREATE TABLE webhook_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    account_id INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    event TEXT NOT NULL,
    backup_id INTEGER,
    restore_id INTEGER,
    payload TEXT,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error TEXT,
    created_at INTEGER NOT NULL,
    finished_at INTEGER
);

-- The delivery task reads each account's oldest pending event.
CREATE INDEX webhook_events_pending ON webhook_events (account_id, seq) WHERE state = 'pending';
-- Purging finished events by age.
CREATE INDEX webhook_events_finished ON webhook_events (finished_at) WHERE state <> 'pending';
