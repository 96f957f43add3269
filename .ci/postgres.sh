#!/usr/bin/env bash
# PostgreSQL for the catalog's PostgreSQL tests (issue 10): starts every
# cluster of this machine and creates the role and database the tests use
# (they make a fresh database per test from it; see
# crates/catalog/tests/common/mod.rs, VPSBACKUP_TEST_DATABASE_URL).
# Idempotent: safe on a machine where it ran before.
set -euo pipefail

pg_lsclusters -h | while read -r ver name _port status _rest; do
  if [[ "$status" != online* ]]; then
    pg_ctlcluster "$ver" "$name" start
  fi
done

runuser -u postgres -- psql -v ON_ERROR_STOP=1 -q <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'vpsbackup') THEN
    CREATE ROLE vpsbackup LOGIN CREATEDB PASSWORD 'vpsbackup';
  END IF;
END $$;
SELECT 'CREATE DATABASE vpsbackup OWNER vpsbackup'
  WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'vpsbackup')\gexec
SQL
