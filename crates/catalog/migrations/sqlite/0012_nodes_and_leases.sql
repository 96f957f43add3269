-- Nodes: the hypervisor machine that holds a server's disks; only workers
-- of that node (its `serve` or `vpsbackup agent`) claim the server's jobs.
-- NULL: a server added before nodes existed; the first `serve` with
-- workers adopts it for its own node.
ALTER TABLE servers ADD COLUMN node TEXT;
CREATE INDEX servers_by_node ON servers (node);

-- The node whose worker ran (or runs) a job.
ALTER TABLE jobs ADD COLUMN node TEXT;
-- A running job's lease: its owner is `claimed_by`, and it holds the job
-- until this time (wall-clock unix seconds), renewed while the job runs.
-- Any process that finds it past requeues (or fails) the job. A job left
-- running by an older build gets ten minutes from its last heartbeat.
ALTER TABLE jobs ADD COLUMN lease_expires_at INTEGER;
UPDATE jobs SET lease_expires_at = COALESCE(heartbeat_at, 0) + 600 WHERE state = 'running';
CREATE INDEX jobs_running_leases ON jobs (lease_expires_at) WHERE state = 'running';
