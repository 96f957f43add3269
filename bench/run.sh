#!/usr/bin/env bash
# Runs the vpsbackup benchmark: makes the images (once), builds release and
# backs up / restores them, printing wall time, MB/s, store growth and peak
# memory per step.
#   bench/run.sh [IMAGES_DIR] [vpsbackup-bench flags...]
# e.g. bench/run.sh /work/bench-images --with-peers --runs 3
# IMAGES_DIR defaults to ./bench-images (keep it out of the repository).
# --with-peers installs restic and borg with apt-get if they are missing.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
images=${1:-bench-images}
shift || true

bash "$repo/bench/make-images.sh" "$images"

for arg in "$@"; do
  if [[ $arg == --with-peers ]] && ! { command -v restic && command -v borg; } >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q restic borgbackup
  fi
done

cargo build --release -p vpsbackup-bench --manifest-path "$repo/Cargo.toml"
exec "$repo/target/release/vpsbackup-bench" --images "$images" "$@"
