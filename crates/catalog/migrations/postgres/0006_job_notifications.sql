-- Workers on other hosts (agents, replicas) hear of a job queued for their
-- node when its transaction commits, rather than at their next poll: a new
-- job, a retry or a requeued job (lease expired, handed back). The payload
-- is the node of the job's server, '' for a server with none yet.
CREATE FUNCTION notify_job_queued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('vpsbackup_jobs',
        COALESCE((SELECT node FROM servers WHERE id = NEW.server_id), ''));
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_queued AFTER INSERT OR UPDATE OF state ON jobs
    FOR EACH ROW WHEN (NEW.state = 'queued') EXECUTE FUNCTION notify_job_queued();
