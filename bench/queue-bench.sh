#!/usr/bin/env bash
# Job-queue benchmark (issue 10): 1,000 servers on 10 nodes, one
# `vpsbackup agent` per node (2 workers each), one API replica
# (`serve --workers 0`), all on one PostgreSQL database and one store; each
# server's disk is a tiny raw image. One manual backup per server is POSTed
# (8 client threads) while the agents run. Reports claims per second (first
# to last job start), the claim latency (POST answered -> job started in an
# agent, from the agents' JSON logs) at p50/p99, the time until every job
# finished, and checks no job was claimed twice (one start per job, every
# job done in its first attempt, on its server's node).
# Needs: PostgreSQL (bash .ci/postgres.sh), psql, python3.
# Usage: bench/queue-bench.sh [servers] [agents]   (BIN=path to use another build)
set -euo pipefail
cd "$(dirname "$0")/.."

SERVERS="${1:-1000}"
AGENTS="${2:-10}"
if [[ -z "${BIN:-}" ]]; then
  BIN=target/release/vpsbackup
  cargo build --release -q -p vpsbackup
fi
ADMIN_URL="${VPSBACKUP_TEST_DATABASE_URL:-postgres://vpsbackup:vpsbackup@127.0.0.1/vpsbackup}"
DB="vpsbackup_queue_bench_$$"
URL="${ADMIN_URL%/*}/$DB"
PORT="${PORT:-18461}"

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  psql "$ADMIN_URL" -q -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
psql "$ADMIN_URL" -q -c "CREATE DATABASE $DB"

export VPSBACKUP_DATABASE_URL="$URL"
STORE="$WORK/store"
mkdir -p "$WORK/admin"
printf '[schedule]\nenabled = false\n' > "$WORK/admin/config.toml"
"$BIN" --data-dir "$WORK/admin" account create bench >/dev/null
TOKEN="$("$BIN" --data-dir "$WORK/admin" token create --account bench --name bench | tail -n 1)"
# One tiny disk per server (64 KiB of random bytes: one chunk each).
mkdir -p "$WORK/disks"
python3 - "$WORK/disks" "$SERVERS" <<'PY'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(1, n + 1):
    with open(f"{d}/{i}.img", "wb") as f:
        f.write(os.urandom(65536))
PY
# The servers, spread over the nodes q0..q(AGENTS-1), written in one
# statement (1,000 `server add` runs would time process start-up).
ACC=$(psql "$URL" -At -c "SELECT id FROM accounts WHERE name = 'bench'")
PLAN=$(psql "$URL" -At -c "SELECT id FROM plans WHERE name = 'standard'")
psql "$URL" -q -v ON_ERROR_STOP=1 <<SQL
INSERT INTO servers (id, name, hostname, account_id, plan_id, created_at, updated_at, node)
  SELECT g, 'q-' || g, '', $ACC, $PLAN, extract(epoch FROM now())::BIGINT,
         extract(epoch FROM now())::BIGINT, 'q' || (g % $AGENTS)
  FROM generate_series(1, $SERVERS) g;
INSERT INTO server_disks (server_id, idx, path, format)
  SELECT g, 0, '$WORK/disks/' || g || '.img', 'raw' FROM generate_series(1, $SERVERS) g;
SQL

VPSBACKUP_LOG=warn "$BIN" --data-dir "$WORK/admin" --store "$STORE" serve --workers 0 \
  --no-rate-limit --listen "127.0.0.1:$PORT" 2>"$WORK/serve.log" &
PIDS+=($!)
for _ in $(seq 1 200); do
  curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break
  sleep 0.1
done
for n in $(seq 0 $((AGENTS - 1))); do
  mkdir -p "$WORK/agent-$n"
  printf '[schedule]\nenabled = false\n' > "$WORK/agent-$n/config.toml"
  VPSBACKUP_LOG=info VPSBACKUP_LOG_FORMAT=json "$BIN" --data-dir "$WORK/agent-$n" --store "$STORE" \
    agent --node "q$n" --workers 2 2>"$WORK/agent-$n.log" &
  PIDS+=($!)
done
sleep 3

echo "== $SERVERS manual backups POSTed (8 threads) to $AGENTS agents"
python3 - "$PORT" "$TOKEN" "$SERVERS" "$WORK" "$URL" "$AGENTS" <<'PY'
import glob, http.client, json, subprocess, sys, threading, time
from datetime import datetime

port, token, n, work, url, agents = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6])
posted = {}  # backup id -> wall time the 201 arrived
lock = threading.Lock()

def post(ids):
    conn = http.client.HTTPConnection("127.0.0.1", port)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    for sid in ids:
        conn.request("POST", "/api/v1/backups/", json.dumps({"server_id": sid}), headers)
        r = conn.getresponse()
        body = r.read()
        t = time.time()
        assert r.status == 201, (r.status, body)
        with lock:
            posted[json.loads(body)["id"]] = t

began = time.time()
threads = [threading.Thread(target=post, args=(list(range(i + 1, n + 1, 8)),)) for i in range(8)]
for t in threads: t.start()
for t in threads: t.join()
post_secs = time.time() - began

def psql(sql):
    return subprocess.run(["psql", url, "-At", "-c", sql], capture_output=True, text=True, check=True).stdout.strip()

while True:
    left = int(psql("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')"))
    if left == 0:
        break
    if time.time() - began > 1800:
        sys.exit(f"{left} jobs still not finished after 30 minutes")
    time.sleep(0.5)
all_done = time.time() - began

starts = {}  # backup id -> [start times]
for path in glob.glob(f"{work}/agent-*.log"):
    for line in open(path):
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("fields", {}).get("message") != "job started":
            continue
        span = ev.get("span", {})
        ts = datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")).timestamp()
        starts.setdefault(span["backup"], []).append(ts)

twice = {b: s for b, s in starts.items() if len(s) > 1}
states = psql("SELECT state || ':' || attempts || ':' || count(*) FROM jobs GROUP BY state, attempts")
wrong_node = int(psql("SELECT count(*) FROM jobs j JOIN servers s ON s.id = j.server_id WHERE j.node IS DISTINCT FROM s.node"))
lat = sorted(starts[b][0] - t for b, t in posted.items() if b in starts)
first = min(s[0] for s in starts.values()); last = max(s[0] for s in starts.values())
pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000
print(f"POSTs: {len(posted)} in {post_secs:.1f} s ({len(posted) / post_secs:.0f}/s)")
print(f"jobs started: {len(starts)}; started more than once: {len(twice)}; jobs by state:attempts:count: {states.split()}")
print(f"jobs on another node than their server's: {wrong_node}")
print(f"claims/s (first to last start): {len(starts) / max(last - first, 1e-9):.0f}")
print(f"claim latency (POST answered -> job started): p50 {pct(0.50):.0f} ms, p99 {pct(0.99):.0f} ms, max {lat[-1] * 1000:.0f} ms")
print(f"all {n} jobs finished {all_done:.1f} s after the first POST")
if twice or len(starts) != n or wrong_node:
    sys.exit("FAILED: a job was claimed twice, not run, or run on the wrong node")
PY
