#!/usr/bin/env bash
# Starts the S3 servers the tests run against, on free ports of 127.0.0.1,
# each with a fresh bucket, and prints the variables the tests read:
#
#   eval "$(.ci/s3/test-servers.sh start DIR [garage] [ceph])"   (default: both)
#   .ci/s3/test-servers.sh stop DIR
#
# Per server KIND (GARAGE, CEPH): VPSBACKUP_TEST_<KIND>_ENDPOINT, _REGION,
# _BUCKET, _ACCESS_KEY_ID, _SECRET_ACCESS_KEY. Progress goes to stderr.
# Garage's binary: $GARAGE, else the CI cache
# (${VPSBACKUP_CI_CACHE:-/var/cache/vpsbackup-ci}/garage-2.5.0/bin/garage),
# else garage on PATH; this script never builds it (.ci/run does, once).
# Ceph comes from Debian's packages (start-ceph-rgw.sh installs them if missing).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${VPSBACKUP_CI_CACHE:-/var/cache/vpsbackup-ci}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# A port nobody listens on, away from Ceph's OSD range (6800-7300).
free_port() {
  local p
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % 20000))
    port_in_use "$p" || { echo "$p"; return; }
  done
  echo "no free port found" >&2; exit 1
}

# Turns start-*.sh's S3_*/AWS_* exports into VPSBACKUP_TEST_<KIND>_* ones.
prefixed() {
  local kind=$1 line
  while read -r line; do
    line=${line#export }
    case $line in
      S3_ENDPOINT=*) echo "export VPSBACKUP_TEST_${kind}_ENDPOINT=${line#*=}" ;;
      S3_BUCKET=*) echo "export VPSBACKUP_TEST_${kind}_BUCKET=${line#*=}" ;;
      AWS_ACCESS_KEY_ID=*) echo "export VPSBACKUP_TEST_${kind}_ACCESS_KEY_ID=${line#*=}" ;;
      AWS_SECRET_ACCESS_KEY=*) echo "export VPSBACKUP_TEST_${kind}_SECRET_ACCESS_KEY=${line#*=}" ;;
      AWS_REGION=*) echo "export VPSBACKUP_TEST_${kind}_REGION=${line#*=}" ;;
    esac
  done
}

cmd=${1:-}; dir=${2:-}
[[ -n $cmd && -n $dir ]] || { echo "usage: $0 start|stop DIR [garage] [ceph]" >&2; exit 2; }
shift 2
case $cmd in
  stop)
    [ -d "$dir/garage" ] && "$here/start-garage.sh" stop "$dir/garage" || true
    [ -d "$dir/ceph" ] && "$here/start-ceph-rgw.sh" stop "$dir/ceph" || true
    ;;
  start)
    kinds=("$@"); ((${#kinds[@]})) || kinds=(garage ceph)
    mkdir -p "$dir"
    for kind in "${kinds[@]}"; do
      case $kind in
        garage)
          if [[ -z ${GARAGE:-} ]]; then
            if [[ -x $cache/garage-2.5.0/bin/garage ]]; then export GARAGE=$cache/garage-2.5.0/bin/garage
            elif command -v garage >/dev/null; then GARAGE=$(command -v garage); export GARAGE
            else echo "garage 2.5.0 is not installed (.ci/run installs it into $cache/garage-2.5.0)" >&2; exit 1
            fi
          fi
          "$here/start-garage.sh" "$dir/garage" "$(free_port)" "$(free_port)" | prefixed GARAGE
          ;;
        ceph)
          "$here/start-ceph-rgw.sh" "$dir/ceph" "$(free_port)" "$(free_port)" | prefixed CEPH
          ;;
        *) echo "unknown server $kind (garage or ceph)" >&2; exit 2 ;;
      esac
    done
    ;;
  *) echo "usage: $0 start|stop DIR [garage] [ceph]" >&2; exit 2 ;;
esac
