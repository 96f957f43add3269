#!/usr/bin/env bash
# API speed benchmark (issue 3): with 10,000 backups in the catalog,
#   - GET /api/v1/backups/ under wrk, 64 connections (target >= 5,000 req/s, p99 <= 20 ms);
#   - POST /api/v1/backups/ latency, sequential on one keep-alive connection
#     (target median <= 5 ms), while the backups it starts run in the background.
# Needs: wrk (apt-get install -y wrk), mke2fs, python3. Usage: bench/api-bench.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${1:-10}"
PORT="${PORT:-18457}"
BIN=target/release/vpsbackup
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }
cargo build --release -q -p vpsbackup

WORK="$(mktemp -d)"
DATA="$WORK/data"
cleanup() {
  [[ -n "${SERVE_PID:-}" ]] && kill -TERM "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

# A small real disk image shared by the benchmark's servers.
mkdir -p "$WORK/content" "$DATA"
head -c 2000000 /dev/urandom > "$WORK/content/random.bin"
cp -r /usr/share/common-licenses "$WORK/content/" 2>/dev/null || true
mke2fs -q -t ext4 -d "$WORK/content" -F "$WORK/disk.img" 16M

# No automatic backups during the measurement.
printf 'workers = 2\n[schedule]\nenabled = false\n' > "$DATA/config.toml"

"$BIN" --data-dir "$DATA" account create bench >/dev/null
TOKEN="$("$BIN" --data-dir "$DATA" token create --account bench --name bench | tail -n 1)"
for id in $(seq 1 40); do
  "$BIN" --data-dir "$DATA" server add --id "$id" --name "bench-$id" --account bench --disk "$WORK/disk.img" >/dev/null
done
"$BIN" --data-dir "$DATA" server add --id 12345 --name web-server-01 --account bench --disk "$WORK/disk.img" >/dev/null
"$BIN" --data-dir "$DATA" bench-seed --server-id 12345 --count 10000

VPSBACKUP_LOG=warn "$BIN" --data-dir "$DATA" serve --listen "127.0.0.1:$PORT" 2>"$WORK/serve.log" &
SERVE_PID=$!
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$PORT/api/v1/openapi.json" >/dev/null && break
  sleep 0.1
done

URL="http://127.0.0.1:$PORT/api/v1/backups/"
echo "== GET $URL (count=$(curl -s "$URL" -H "Authorization: Bearer $TOKEN" | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])'), 50 per page)"
wrk -t2 -c64 -d"${DURATION}s" --latency -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" "$URL" | tee "$WORK/wrk.txt"
RPS=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.txt")
P99=$(awk '$1 == "99%" {print $2}' "$WORK/wrk.txt")
NON2XX=$(awk '/Non-2xx/ {print $NF}' "$WORK/wrk.txt")

echo "== POST $URL (400 requests over 40 servers, 10 each: the manual limit)"
POST=$(python3 - "$PORT" "$TOKEN" <<'PY'
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
echo "$POST"
echo
echo "RESULT: GET /api/v1/backups/ ${RPS} req/s, p99 ${P99}${NON2XX:+, non-2xx $NON2XX} | POST /api/v1/backups/ ${POST}"
