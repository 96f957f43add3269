-- Issue 10, part 4: several `serve` replicas on one catalog, and listings
-- of accounts with many servers.

-- A listing's `count` for a whole account (the unfiltered
-- GET /api/v1/backups/) summed one backup_counts row per server, so it grew
-- with the account's servers (2,000 rows for 1,000 servers). These rows are
-- that sum per account and type, kept by triggers on backup_counts itself,
-- so every path that changes backup_counts (a backup's insert or delete, a
-- server's removal) moves them in the same transaction.
CREATE TABLE account_backup_counts (
    account_id  INTEGER NOT NULL,
    backup_type TEXT    NOT NULL,
    n           INTEGER NOT NULL,
    PRIMARY KEY (account_id, backup_type)
) WITHOUT ROWID;

INSERT INTO account_backup_counts (account_id, backup_type, n)
    SELECT account_id, backup_type, SUM(n) FROM backup_counts
    GROUP BY account_id, backup_type;

CREATE TRIGGER account_counts_on_insert AFTER INSERT ON backup_counts BEGIN
    INSERT INTO account_backup_counts (account_id, backup_type, n)
        VALUES (NEW.account_id, NEW.backup_type, NEW.n)
        ON CONFLICT (account_id, backup_type) DO UPDATE SET n = n + excluded.n;
END;

CREATE TRIGGER account_counts_on_update AFTER UPDATE OF n ON backup_counts BEGIN
    UPDATE account_backup_counts SET n = n + NEW.n - OLD.n
        WHERE account_id = NEW.account_id AND backup_type = NEW.backup_type;
END;

CREATE TRIGGER account_counts_on_delete AFTER DELETE ON backup_counts BEGIN
    UPDATE account_backup_counts SET n = n - OLD.n
        WHERE account_id = OLD.account_id AND backup_type = OLD.backup_type;
END;

-- The webhook outbox is drained by every replica: an event is claimed (until
-- this unix time, wall clock) by the one that sends it, so each attempt is
-- made by one process. NULL: not claimed.
ALTER TABLE webhook_events ADD COLUMN claimed_until INTEGER;
