#!/usr/bin/env bash
# API speed benchmark (issues 3 and 10): GET /api/v1/backups/ under wrk, 64
# connections, all jobs finished (target >= 5,000 req/s, p99 <= 20 ms), on
# either catalog and either data shape:
#
#   BACKEND=sqlite    the data dir's catalog.db (default)
#   BACKEND=postgres  a fresh database made with psql on $VPSBACKUP_TEST_DATABASE_URL's
#                     server (default postgres://vpsbackup:vpsbackup@127.0.0.1/vpsbackup,
#                     see .ci/postgres.sh), dropped at the end
#   BACKEND=both      seeded once on SQLite and measured there, then copied to a
#                     fresh PostgreSQL database (`vpsbackup catalog migrate`, ids
#                     intact) and measured there: the same rows on both
#
#   SHAPE=single  10,000 backups of one server (bench-seed rows) and 40 more
#                 servers; also POST /api/v1/backups/ latency, sequential on one
#                 keep-alive connection (target median <= 5 ms)
#   SHAPE=fleet   a provider's customer: $SERVERS servers (1,000), $MANUAL (10)
#                 manual backups each created through the API, and $AUTO_DAYS (3)
#                 days of their automatic backups made by the scheduler (a
#                 simulated clock, VPSBACKUP_TEST_CLOCK_FILE, steps the days),
#                 every one a real backup of a small ext4 image
#
# BEFORE_BIN=PATH also measures that binary on the same catalog first (it must
# read the same schema), so a change is measured before and after side by side;
# ROUNDS=N repeats the measurement N times (alternating with BEFORE_BIN).
# BIN=PATH uses a built binary instead of building release. The load average is
# printed beside the figures: others' builds skew them.
# Needs: wrk (installed with apt-get if missing), mke2fs, python3, curl, psql for
# BACKEND=postgres. Usage: [BACKEND=..] [SHAPE=..] bench/api-bench.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${1:-10}"
PORT="${PORT:-18457}"
OPS_PORT="${OPS_PORT:-18458}"
BACKEND="${BACKEND:-sqlite}"
SHAPE="${SHAPE:-single}"
SERVERS="${SERVERS:-1000}"
MANUAL="${MANUAL:-10}"
AUTO_DAYS="${AUTO_DAYS:-3}"
if ! command -v wrk >/dev/null; then
  apt-get install -y -q wrk >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q wrk >/dev/null; }
fi
if [[ -z "${BIN:-}" ]]; then
  cargo build --release -q -p vpsbackup
  BIN=target/release/vpsbackup
fi
BIN="$(realpath "$BIN")"

WORK="$(mktemp -d)"
DATA="$WORK/data"
DB_NAME=""
ADMIN_URL="${VPSBACKUP_TEST_DATABASE_URL:-postgres://vpsbackup:vpsbackup@127.0.0.1/vpsbackup}"
cleanup() {
  [[ -n "${SERVE_PID:-}" ]] && kill -TERM "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null
  [[ -n "$DB_NAME" ]] && psql "$ADMIN_URL" -q -c "DROP DATABASE IF EXISTS $DB_NAME WITH (FORCE)" >/dev/null 2>&1
  rm -rf "$WORK"
}
trap cleanup EXIT

make_database() {
  DB_NAME="vpsbackup_api_bench_$$"
  psql "$ADMIN_URL" -v ON_ERROR_STOP=1 -q -c "CREATE DATABASE $DB_NAME"
  PG_URL="${ADMIN_URL%/*}/$DB_NAME"
}
case "$BACKEND" in
  sqlite | both) ;;
  postgres) make_database; export VPSBACKUP_DATABASE_URL="$PG_URL" ;;
  *) echo "BACKEND is sqlite, postgres or both" >&2; exit 2 ;;
esac

# A small real disk image shared by the benchmark's servers.
mkdir -p "$WORK/content" "$DATA"
head -c 2000000 /dev/urandom > "$WORK/content/random.bin"
cp -r /usr/share/common-licenses "$WORK/content/" 2>/dev/null || true
mke2fs -q -t ext4 -d "$WORK/content" -F "$WORK/disk.img" 16M

# No automatic backups during the measurement.
quiet_config() { printf 'workers = 2\n[schedule]\nenabled = false\n' > "$DATA/config.toml"; }
quiet_config

"$BIN" --data-dir "$DATA" account create bench >/dev/null
TOKEN="$("$BIN" --data-dir "$DATA" token create --account bench --name bench | tail -n 1)"
URL="http://127.0.0.1:$PORT/api/v1/backups/"

start_serve() { # BINARY [extra env...]
  local bin="$1"; shift
  env "$@" VPSBACKUP_LOG=warn "$bin" --data-dir "$DATA" serve --listen "127.0.0.1:$PORT" \
    --metrics-listen "127.0.0.1:$OPS_PORT" 2>>"$WORK/serve.log" &
  SERVE_PID=$!
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$PORT/api/v1/openapi.json" >/dev/null && return 0
    sleep 0.1
  done
  echo "serve did not start:" >&2; tail -5 "$WORK/serve.log" >&2; exit 1
}
stop_serve() { kill -TERM "$SERVE_PID"; wait "$SERVE_PID" 2>/dev/null || true; SERVE_PID=""; }
# Jobs queued or running, catalog-wide (the ops listener's gauge).
jobs_left() {
  curl -sf "http://127.0.0.1:$OPS_PORT/metrics" | awk '/^vpsbackup_queue_jobs\{/ {n += $2} END {print n + 0}'
}
wait_jobs() { # WHAT
  local t0=$SECONDS
  sleep 1
  until [[ "$(jobs_left)" == 0 ]]; do sleep 1; done
  echo "   $1: all jobs finished in $((SECONDS - t0)) s"
}
count() { curl -s "$URL" -H "Authorization: Bearer $TOKEN" | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])'; }

if [[ "$SHAPE" == single ]]; then
  for id in $(seq 1 40); do
    "$BIN" --data-dir "$DATA" server add --id "$id" --name "bench-$id" --account bench --disk "$WORK/disk.img" >/dev/null
  done
  "$BIN" --data-dir "$DATA" server add --id 12345 --name web-server-01 --account bench --disk "$WORK/disk.img" >/dev/null
  "$BIN" --data-dir "$DATA" bench-seed --server-id 12345 --count 10000
elif [[ "$SHAPE" == fleet ]]; then
  echo "== seeding: $SERVERS servers, $AUTO_DAYS days of automatic backups, $MANUAL manual backups each (through the API)"
  seq 1 "$SERVERS" | xargs -P 4 -I{} "$BIN" --data-dir "$DATA" server add --id {} --name "vps-{}" \
    --account bench --disk "$WORK/disk.img" >/dev/null
  printf 'workers = 4\n[schedule]\ntick_secs = 1\nverify_interval_days = 0\ngc_interval_hours = 0\n[rate_limit]\nenabled = false\n' > "$DATA/config.toml"
  CLOCK="$WORK/clock"
  today=$(( $(date +%s) / 86400 * 86400 ))
  echo $(( today + 86400 + 23 * 3600 )) > "$CLOCK"
  start_serve "$BIN" VPSBACKUP_TEST_CLOCK_FILE="$CLOCK"
  for day in $(seq 1 "$AUTO_DAYS"); do
    echo $(( today + day * 86400 + 23 * 3600 )) > "$CLOCK"
    until [[ "$(count)" -ge $(( day * SERVERS )) ]]; do sleep 1; done
    wait_jobs "day $day"
  done
  python3 - "$PORT" "$TOKEN" "$SERVERS" "$MANUAL" <<'PY'
import http.client, json, sys
port, token, servers, manual = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
conn = http.client.HTTPConnection("127.0.0.1", port)
headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
codes = {}
for i in range(manual):
    for s in range(1, servers + 1):
        conn.request("POST", "/api/v1/backups/", json.dumps({"server_id": s, "description": f"manual {i}"}), headers)
        r = conn.getresponse(); r.read()
        codes[r.status] = codes.get(r.status, 0) + 1
print(f"   manual POSTs: statuses {codes}")
PY
  wait_jobs "manual backups"
  stop_serve
  quiet_config
else
  echo "SHAPE is single or fleet" >&2; exit 2
fi

CATALOG="$BACKEND"
measure() { # LABEL BINARY
  start_serve "$2"
  local n; n=$(count)
  echo "== $1: GET $URL (count=$n, 50 per page), $CATALOG, $SHAPE"
  wrk -t2 -c64 -d"${DURATION}s" --latency -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" "$URL" > "$WORK/wrk.txt"
  local load; load=$(cut -d' ' -f1-3 /proc/loadavg)
  local rps p99 non2xx
  rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.txt")
  p99=$(awk '$1 == "99%" {print $2}' "$WORK/wrk.txt")
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$WORK/wrk.txt")
  grep -E 'Latency|Req/Sec|Requests/sec|50%|99%' "$WORK/wrk.txt" | sed 's/^/   /'
  RESULTS+=("RESULT $1 $CATALOG $SHAPE count=$n: GET /api/v1/backups/ ${rps} req/s, p99 ${p99}${non2xx:+, non-2xx $non2xx} (load average $load)")
  if [[ "$1" != before && "$SHAPE" == single && -z "${SKIP_POST:-}" ]]; then
    post_latency
    wait_jobs "the POSTs' backups"
  fi
  stop_serve
}

post_latency() {
  echo "== POST $URL (400 requests over 40 servers, 10 each: the manual limit)"
  local post
  post=$(python3 - "$PORT" "$TOKEN" <<'PY'
import http.client, json, statistics, sys, time
port, token = int(sys.argv[1]), sys.argv[2]
conn = http.client.HTTPConnection("127.0.0.1", port)
headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
lat, codes = [], {}
for i in range(400):
    body = json.dumps({"server_id": 1 + i % 40, "description": f"bench {i}"})
    t = time.perf_counter()
    conn.request("POST", "/api/v1/backups/", body, headers)
    r = conn.getresponse(); r.read()
    lat.append((time.perf_counter() - t) * 1000)
    codes[r.status] = codes.get(r.status, 0) + 1
lat.sort()
print(f"median {statistics.median(lat):.2f} ms, p90 {lat[int(len(lat)*0.9)]:.2f} ms, p99 {lat[int(len(lat)*0.99)]:.2f} ms, statuses {codes}")
PY
)
  echo "$post"
  RESULTS+=("RESULT POST /api/v1/backups/ $CATALOG: $post")
}

measure_all() {
  local round
  for round in $(seq 1 "${ROUNDS:-1}"); do
    if [[ -n "${BEFORE_BIN:-}" ]]; then
      measure before "$(realpath "$BEFORE_BIN")"
      measure after "$BIN"
    else
      measure run "$BIN"
    fi
    # The first round's POSTs used up the servers' manual limit.
    SKIP_POST=1
  done
}
RESULTS=()
if [[ "$BACKEND" == both ]]; then
  CATALOG=sqlite
  measure_all
  make_database
  "$BIN" --data-dir "$DATA" catalog migrate --to "$PG_URL" | tail -n 1
  export VPSBACKUP_DATABASE_URL="$PG_URL"
  CATALOG=postgres
  # The POSTs of the SQLite run used up the manual limit of servers 1-40:
  # the copy has them too, so the POST figure would be all 400s.
  [[ "$SHAPE" == single ]] && SKIP_POST=1
  measure_all
else
  measure_all
fi
echo
printf '%s\n' "${RESULTS[@]}"
