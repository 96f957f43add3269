-- As SQLite's 0012: the node holding each server's disks (NULL: added
-- before nodes existed, adopted by the first `serve` with workers), the
-- node that ran each job, and a running job's lease (owner `claimed_by`,
-- held until `lease_expires_at`, wall-clock unix seconds).
ALTER TABLE servers ADD COLUMN node TEXT;
CREATE INDEX servers_by_node ON servers (node);
ALTER TABLE jobs ADD COLUMN node TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires_at BIGINT;
UPDATE jobs SET lease_expires_at = COALESCE(heartbeat_at, 0) + 600 WHERE state = 'running';
CREATE INDEX jobs_running_leases ON jobs (lease_expires_at) WHERE state = 'running';
