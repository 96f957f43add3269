-- As SQLite's 0011: how each backup read its disks (incremental from
-- QEMU's dirty bitmaps or full, bytes read, why a full read, consistency),
-- and the host end of a qemu server's guest agent channel.
ALTER TABLE backups ADD COLUMN incremental BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE backups ADD COLUMN bytes_read BIGINT;
ALTER TABLE backups ADD COLUMN full_reason TEXT;
ALTER TABLE backups ADD COLUMN consistency TEXT;
ALTER TABLE servers ADD COLUMN guest_agent TEXT;
