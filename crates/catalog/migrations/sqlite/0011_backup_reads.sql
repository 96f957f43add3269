-- How each backup read its disks: incremental (only what QEMU's dirty
-- bitmaps marked as changed since the previous backup) or full, the bytes
-- it read, why it read in full when it could have built on a previous
-- backup, and how consistent its point in time is. NULL bytes_read: a
-- backup made before this was recorded (or not completed).
ALTER TABLE backups ADD COLUMN incremental INTEGER NOT NULL DEFAULT 0;
ALTER TABLE backups ADD COLUMN bytes_read INTEGER;
ALTER TABLE backups ADD COLUMN full_reason TEXT;
ALTER TABLE backups ADD COLUMN consistency TEXT;

-- The host end of a qemu server's guest agent channel (a unix socket), to
-- freeze its filesystems for the instant of the point in time.
ALTER TABLE servers ADD COLUMN guest_agent TEXT;
