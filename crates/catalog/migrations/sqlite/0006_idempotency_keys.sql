-- Idempotency keys of create requests (POST /backups/, /servers/{id}/backup/,
-- /servers/{id}/restore/). The primary key makes the first request with a
-- key the only one that can claim it: a concurrent duplicate's INSERT finds
-- the row instead of creating a second backup. `owner` scopes keys to whom
-- the token acts for ('account:<id>' or 'admin'), so customers' keys never
-- meet. `status` and `body` stay NULL while the first request runs.
CREATE TABLE idempotency_keys (
    owner TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    request_hash BLOB NOT NULL,
    status INTEGER,
    body BLOB,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (owner, idem_key)
) WITHOUT ROWID;

-- Expiry deletes by age.
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
