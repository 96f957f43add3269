-- Workers on other hosts (agents, replicas) hear of a job queued for their
-- node when its transaction commits, rather than at their next poll: a new
-- job, a retry or a requeued job (lease expired, handed back). One channel
-- per node, so a node's listener hears only its own jobs:
-- `vpsbackup_jobs_` and the MD5 of the node's name (a channel is an
-- identifier of at most 63 bytes; a node name may have 253 characters), or
-- `vpsbackup_jobs` for a server on no node yet (any node may adopt it).
CREATE FUNCTION notify_job_queued() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    server_node TEXT;
BEGIN
    SELECT node INTO server_node FROM servers WHERE id = NEW.server_id;
    PERFORM pg_notify(
        CASE WHEN server_node IS NULL THEN 'vpsbackup_jobs'
             ELSE 'vpsbackup_jobs_' || md5(server_node) END,
        '');
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_queued AFTER INSERT OR UPDATE OF state ON jobs
    FOR EACH ROW WHEN (NEW.state = 'queued') EXECUTE FUNCTION notify_job_queued();
