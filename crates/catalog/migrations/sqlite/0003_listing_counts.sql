-- Fast backup listings (issue 3's benchmark: 10,000 backups, 5,000 list
-- requests a second).
--
-- Pages walk an index in id order instead of sorting every match.
CREATE INDEX backups_by_account_id ON backups (account_id, id);
CREATE INDEX backups_by_server_id ON backups (server_id, id);

-- A list's `count` under any filter (account, server, type) is a sum over
-- these few rows instead of a scan of every backup. Kept exact by triggers,
-- inside the same transaction as the insert or delete that changes it.
CREATE TABLE backup_counts (
    server_id   INTEGER NOT NULL,
    backup_type TEXT    NOT NULL,
    account_id  INTEGER NOT NULL,
    n           INTEGER NOT NULL,
    PRIMARY KEY (server_id, backup_type)
) WITHOUT ROWID;
CREATE INDEX backup_counts_by_account ON backup_counts (account_id);

INSERT INTO backup_counts (server_id, backup_type, account_id, n)
    SELECT server_id, backup_type, account_id, COUNT(*) FROM backups
    GROUP BY server_id, backup_type, account_id;

CREATE TRIGGER backups_counted_on_insert AFTER INSERT ON backups BEGIN
    INSERT INTO backup_counts (server_id, backup_type, account_id, n)
        VALUES (NEW.server_id, NEW.backup_type, NEW.account_id, 1)
        ON CONFLICT (server_id, backup_type) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER backups_counted_on_delete AFTER DELETE ON backups BEGIN
    UPDATE backup_counts SET n = n - 1
        WHERE server_id = OLD.server_id AND backup_type = OLD.backup_type;
END;

-- A server id can be reused for another account after a remove: its counts go with it.
CREATE TRIGGER backup_counts_follow_servers AFTER DELETE ON servers BEGIN
    DELETE FROM backup_counts WHERE server_id = OLD.id;
END;
