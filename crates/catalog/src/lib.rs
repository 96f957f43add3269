//! The catalog: accounts, tokens, plans, servers, backups, restores and jobs (issue 3).
