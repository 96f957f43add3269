#!/usr/bin/env bash
# Fuzzes the running API against its own OpenAPI document with schemathesis:
# every check, every phase (examples, coverage, fuzzing, stateful), a fixed
# seed and a bounded number of examples, so a run is repeatable and takes a
# few minutes on 2 cores. Exits non-zero on any failure.
#
# The server is the real `vpsbackup serve --demo` on a free port with a
# fresh data dir. Its rate limits are raised far above what the fuzzer sends
# (not switched off), so every answer still carries the RateLimit-* headers
# the document promises and the fuzzer checks them.
#
# Usage: .ci/schemathesis.sh [path/to/vpsbackup]   (default: builds target/debug/vpsbackup)
# Env:   ST_MAX_EXAMPLES (default 100), ST_SEED (default 8), VPSBACKUP_CI_CACHE
#        (venv cache dir, default /var/cache/vpsbackup-ci)
set -euo pipefail
cd "$(dirname "$0")/.."

ST_VERSION=4.32.5
ST_SEED=${ST_SEED:-8}
ST_MAX_EXAMPLES=${ST_MAX_EXAMPLES:-100}
cache=${VPSBACKUP_CI_CACHE:-/var/cache/vpsbackup-ci}
# schemathesis and every package under it are pinned; the venv is named
# after the pins, so changing them makes a new one.
pins=.ci/schemathesis-requirements.txt
venv="$cache/schemathesis-$ST_VERSION-$(sha256sum "$pins" | cut -c1-12)"

# The pinned schemathesis, in a venv kept between runs.
if ! "$venv/bin/st" --version 2>/dev/null | grep -qx "st, version $ST_VERSION"; then
  mkdir -p "$cache"
  rm -rf "$venv"
  if ! python3 -m venv "$venv"; then
    # Debian's python3 keeps venv (ensurepip) in a package of its own.
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q && apt-get install -y -q python3-venv
    rm -rf "$venv"
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check -c "$pins" "schemathesis==$ST_VERSION"
fi

bin=${1:-}
if [[ -z $bin ]]; then
  cargo build --locked -p vpsbackup --bin vpsbackup
  bin=target/debug/vpsbackup
fi

work=$(mktemp -d)
server_pid=
st_pid=
# Stops what this script started, by pid, on every way out. The fuzzer runs
# in the background (and is waited for) so a TERM or Ctrl-C is handled at
# once rather than after it ends.
stop() {
  if [[ -n $st_pid ]]; then
    kill -TERM "$st_pid" 2>/dev/null || true
    wait "$st_pid" 2>/dev/null || true
  fi
  if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap stop EXIT
trap 'exit 130' INT TERM

# Port 0: the kernel picks a free port; the demo prints the address it got.
VPSBACKUP_LOG=${VPSBACKUP_LOG:-warn} "$bin" --data-dir "$work/data" serve --demo \
  --listen 127.0.0.1:0 --rate-limit-read 100000/1000000 --rate-limit-write 100000/1000000 \
  >"$work/out" 2>"$work/log" &
server_pid=$!
for _ in $(seq 300); do
  grep -q '^vps_' "$work/out" 2>/dev/null && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/out" "$work/log" >&2; echo "the server exited at start" >&2; exit 1; }
  sleep 0.1
done
token=$(grep -m1 '^vps_' "$work/out") || { cat "$work/out" "$work/log" >&2; echo "no demo token" >&2; exit 1; }
addr=$(grep -m1 -o 'http://[0-9.:]*/api/v1/docs/' "$work/out" | sed 's|/api/v1/docs/||')
echo "fuzzing $addr (schemathesis $ST_VERSION, seed $ST_SEED, $ST_MAX_EXAMPLES examples per operation)"

status=0
# schemathesis.toml: per-operation settings; schemathesis_checks.py: one
# more check (see both files for why).
PYTHONPATH=.ci SCHEMATHESIS_HOOKS=schemathesis_checks \
"$venv/bin/st" --config-file .ci/schemathesis.toml run "$addr/api/v1/openapi.json" \
  --url "$addr" \
  --header "Authorization: Bearer $token" \
  --checks all \
  --phases examples,coverage,fuzzing,stateful \
  --seed "$ST_SEED" \
  --max-examples "$ST_MAX_EXAMPLES" \
  --workers 1 \
  --request-timeout 30 \
  --generation-database none \
  --no-color >"$work/st.out" 2>&1 &
st_pid=$!
tail -n +1 -f --pid="$st_pid" "$work/st.out" &
tail_pid=$!
wait "$st_pid" || status=$?
st_pid=
wait "$tail_pid" || true
# One closing line in the plain "N passed, N failed" form, from st's summary
# ("1842 generated, 1842 passed, 20 skipped" or "..., 2 found 2 unique failures, ...").
summary=$(grep -E '^ *[0-9]+ generated' "$work/st.out" | tail -n 1 || true)
generated=$(grep -oE '[0-9]+ generated' <<<"$summary" | grep -oE '[0-9]+' || echo 0)
failed=$(grep -oE 'found [0-9]+ unique' <<<"$summary" | grep -oE '[0-9]+' || echo 0)
# st names the passed cases only when none failed; else every case but the failing ones passed.
passed=$(grep -oE '[0-9]+ passed' <<<"$summary" | grep -oE '[0-9]+' || echo $((generated - failed)))
# A run that stopped on an error (schema not loaded, server gone) counts as one failure.
if ((status != 0 && failed == 0)); then failed=1; fi
if ((status == 0 && failed == 0 && passed == 0)); then
  echo "schemathesis ran no test case" >&2
  status=1
fi
if ((status)); then
  echo "schemathesis found failures (exit $status); server log:" >&2
  tail -n 50 "$work/log" >&2
fi
echo "schemathesis: $passed passed, $failed failed"
exit "$status"
