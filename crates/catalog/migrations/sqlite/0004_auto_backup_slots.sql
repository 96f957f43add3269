-- Issue 4: the latest day an automatic backup was created for, per server.
-- Kept apart from the backup rows so a customer deleting today's automatic
-- backup does not make the scheduler take another one the same day.
CREATE TABLE auto_backup_slots (
    server_id INTEGER PRIMARY KEY REFERENCES servers(id) ON DELETE CASCADE,
    last_slot INTEGER NOT NULL
);
