-- Each server disk's image format, recorded when the provider adds the
-- server. A raw disk's first bytes belong to the guest, which can write a
-- qcow2 header there: the format must never be probed from the image on a
-- backup or a restore. NULL on rows that predate this column: the job runner
-- detects the format once and records it (see JobRunner).
ALTER TABLE server_disks ADD COLUMN format TEXT CHECK (format IN ('raw', 'qcow2', 'block'));
