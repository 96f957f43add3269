-- The operator's detail of a failed job (host paths, a hook's or QEMU's
-- stderr). The customer's plain reason stays in backups.error /
-- restores.error; this column is never shown by the API, only by
-- `vpsbackup failures`.
ALTER TABLE jobs ADD COLUMN error_detail TEXT;
