-- Every process that authenticates API requests caches its token lookups
-- (src/postgres/tokens.rs) and empties its cache whenever a statement
-- changes or deletes tokens or accounts: a revoked token stops working at
-- once on every replica, whichever process revoked it. A new token needs no
-- notice (the caches keep only tokens they found). The notification is
-- sent when the transaction commits.
CREATE FUNCTION notify_token_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('vpsbackup_tokens', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER api_tokens_changed AFTER UPDATE OR DELETE OR TRUNCATE ON api_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION notify_token_change();
CREATE TRIGGER accounts_changed AFTER UPDATE OR DELETE OR TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION notify_token_change();
