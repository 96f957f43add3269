-- As SQLite's 0013 (issue 10, part 4): per-account backup counts for the
-- unfiltered listing, kept by triggers on backup_counts, and the webhook
-- outbox's claim (unix time, wall clock) so one replica makes each attempt.
CREATE TABLE account_backup_counts (
    account_id  BIGINT NOT NULL,
    backup_type TEXT   NOT NULL,
    n           BIGINT NOT NULL,
    PRIMARY KEY (account_id, backup_type)
);

INSERT INTO account_backup_counts (account_id, backup_type, n)
    SELECT account_id, backup_type, SUM(n) FROM backup_counts
    GROUP BY account_id, backup_type;

-- One function for the three events: the difference a backup_counts row
-- change makes to its account's total. The account row is locked by the
-- update for the rest of the transaction, so concurrent creates of one
-- account serialise on it only for their (short) commit.
CREATE FUNCTION account_counts_follow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE account_backup_counts SET n = n - OLD.n
            WHERE account_id = OLD.account_id AND backup_type = OLD.backup_type;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO account_backup_counts (account_id, backup_type, n)
            VALUES (NEW.account_id, NEW.backup_type, NEW.n)
            ON CONFLICT (account_id, backup_type)
            DO UPDATE SET n = account_backup_counts.n + excluded.n;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER account_counts_follow AFTER INSERT OR UPDATE OR DELETE ON backup_counts
    FOR EACH ROW EXECUTE FUNCTION account_counts_follow();

ALTER TABLE webhook_events ADD COLUMN claimed_until BIGINT;
