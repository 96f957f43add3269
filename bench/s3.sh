#!/usr/bin/env bash
# Backup and restore of a benchmark image to a local store, to Garage and to
# Ceph radosgw, side by side in one run (issue 11's speed target: S3 backup
# within 1.3x of local, restore within 1.5x). Medians of RUNS fresh stores.
#
#   bench/s3.sh [IMAGE] [RUNS]
#
# IMAGE defaults to base.raw made by bench/make-images.sh in
# ${BENCH_IMAGES:-/work/bench-images} (4 GiB, ~2.2 GB of data, ~1 GB
# stored). RUNS defaults to 3. Ceph's memstore OSD keeps every run's store in
# memory: it is sized to RUNS x 1.5 GiB + 1 GiB (MEMSTORE_BYTES overrides).
# Builds the release binary (or uses $VPSBACKUP_BIN), starts both servers
# (.ci/s3/test-servers.sh) and stops them at the end.
#
# PIN=1 gives the servers the last CPU and vpsbackup the others, for every
# row (the local one too): a storage cluster runs on its own machines, and
# on a 2-core box the servers' own hashing (Garage: MD5 for the ETag, BLAKE2
# per block; radosgw: MD5 and the memstore copy) otherwise takes the cores a
# backup uses. Without PIN every process shares every core.
set -euo pipefail
cd "$(dirname "$0")/.."
images=${BENCH_IMAGES:-/work/bench-images}
img=${1:-$images/base.raw}
runs=${2:-3}
if [[ ! -f $img ]]; then
  bash bench/make-images.sh "$images" >&2
fi
bin=${VPSBACKUP_BIN:-}
if [[ -z $bin ]]; then
  cargo build --release --locked -p vpsbackup --bin vpsbackup >&2
  bin=$PWD/target/release/vpsbackup
fi
work=$(mktemp -d)
trap '.ci/s3/test-servers.sh stop "$work/srv" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
export MEMSTORE_BYTES=${MEMSTORE_BYTES:-$((runs * 3 * 512 * 1024 * 1024 + (1 << 30)))}
eval "$(.ci/s3/test-servers.sh start "$work/srv" garage ceph)"
run=()
if [[ -n ${PIN:-} ]]; then
  last=$(($(nproc) - 1))
  ((last > 0)) || { echo "PIN needs 2 CPUs or more" >&2; exit 1; }
  for name in garage radosgw ceph-osd ceph-mon; do
    for pid in $(pgrep -x "$name"); do taskset -a -c -p "$last" "$pid" >/dev/null; done
  done
  run=(taskset -c "0-$((last - 1))")
fi

# backup then restore of $img into store $2 ($1 names the row); prints
# "seconds_backup seconds_restore backup_PUTs restore_GETs".
one() {
  local name=$1 store=$2; shift 2
  local b r
  # The image in the page cache for every row alike.
  cat "$img" >/dev/null
  b=$(env "$@" "${run[@]}" "$bin" store backup "$store" --id b1 --server-id s --disk "$img" --json)
  rm -f "$work/out.raw"
  r=$(env "$@" "${run[@]}" "$bin" store restore "$store" b1 --to "$work/out.raw" --json)
  cmp "$img" "$work/out.raw" || { echo "$name: restore differs" >&2; exit 1; }
  rm -f "$work/out.raw"
  python3 -c 'import json,sys; b=json.loads(sys.argv[1]); r=json.loads(sys.argv[2]); q=b.get("requests",{}); g=r.get("requests",{}); print(b["seconds"], r["seconds"], q.get("put",0), g.get("get",0))' "$b" "$r"
}

declare -A rows
for i in $(seq "$runs"); do
  rm -rf "$work/local"
  rows[local]+="$(one local "$work/local")"$'\n'
  rm -rf "$work/local"
  for kind in GARAGE CEPH; do
    ep=VPSBACKUP_TEST_${kind}_ENDPOINT; rg=VPSBACKUP_TEST_${kind}_REGION; bk=VPSBACKUP_TEST_${kind}_BUCKET
    ak=VPSBACKUP_TEST_${kind}_ACCESS_KEY_ID; sk=VPSBACKUP_TEST_${kind}_SECRET_ACCESS_KEY
    rows[$kind]+="$(one "$kind" "s3://${!bk}/bench-$i" AWS_ACCESS_KEY_ID="${!ak}" AWS_SECRET_ACCESS_KEY="${!sk}" \
      VPSBACKUP_S3_ENDPOINT="${!ep}" VPSBACKUP_S3_REGION="${!rg}")"$'\n'
  done
done

python3 - "$img" "${rows[local]}" "${rows[GARAGE]}" "${rows[CEPH]}" <<'EOF'
import os, statistics, sys
img = sys.argv[1]
def med(text):
    rows = [list(map(float, l.split())) for l in text.strip().splitlines()]
    return [statistics.median(c) for c in zip(*rows)], len(rows)
(lb, lr, _, _), n = med(sys.argv[2])
print(f"image {img}, median of {n} runs, {'servers pinned to the last CPU' if os.environ.get('PIN') else 'all CPUs shared'}, load {open('/proc/loadavg').read().split()[0]}")
print(f"{'store':<8} {'backup s':>9} {'x local':>8} {'restore s':>10} {'x local':>8} {'PUTs':>6} {'GETs':>6}  (PUTs of the backup, GETs of the restore)")
print(f"{'local':<8} {lb:>9.2f} {1:>8.2f} {lr:>10.2f} {1:>8.2f} {'-':>6} {'-':>6}")
for name, text in (("garage", sys.argv[3]), ("ceph", sys.argv[4])):
    (b, r, p, g), _ = med(text)
    print(f"{name:<8} {b:>9.2f} {b/lb:>8.2f} {r:>10.2f} {r/lr:>8.2f} {p:>6.0f} {g:>6.0f}")
EOF
