#!/usr/bin/env bash
# Chunk downloads over one connection to the registry against several (snapctl
# --chunk-connections, here through SNAPCTL_CHUNK_CONNECTIONS), side by side in one run
# on the GPU machine: the medium preset's transparent `checkpoint --cuda` snapshot,
# restored with `pull-restore --lazy` (the fill fetches 3.56 GB of device memory first)
# and eagerly, every restore into an empty node cache with the page cache dropped.
# First from the registry on disk, then from the registry in memory
# (registry_into_memory), where the fetch stack is what limits the fill. The local
# `criu restore` from /dev/shm + CUDA restore is the baseline. Needs what separated.sh
# needs; results (summary.env, restores.jsonl, rs-*.json, run.log) go to $OUT.
#   PRESET=medium DEADLINE=555 OUT=/tmp/conn bash bench/gpu/connections.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/snapreg-conn}" W=/var/tmp/snapreg-conn
. bench/gpu/common.sh
A=/tmp/ctl-a
REF="hf/$PRESET:transparent"
MANY="${MANY:-4}"
lazy_with() { # NAME CONNECTIONS
  SNAPCTL_CHUNK_CONNECTIONS=$2 lazy_restore "$1" "$A" "$A.log.ck" "$W/cache-$1" "$REF"
  rm -rf "$W/cache-$1"
}
eager_with() { # NAME CONNECTIONS
  SNAPCTL_CHUNK_CONNECTIONS=$2 timed_restore "$1" "$A" "$A.log.ck" "$W/cache-$1" "$REF"
  rm -rf "$W/cache-$1"
}

say "cold start ($PRESET)"
start_worker "$A"
result cold_start_wall_s "$WALL"
say "checkpoint --cuda"
timeout 180 "$B/snapctl" --json checkpoint --cuda --pid "$PID" "$REF" | tail -n 1 | tee "$OUT/ck-transparent.json"
gone "$PID"
cp -p "$A.log" "$A.log.ck"

say "local criu restore + CUDA restore (baseline)"
"$B/snapctl" --json pull "$REF" /dev/shm/local | tail -n 1 >/dev/null
local_restore local "$A" "$A.log.ck"
rm -rf /dev/shm/local

say "registry on disk: --lazy over 1, then $MANY connections"
lazy_with disk_lazy_c1 1
lazy_with "disk_lazy_c$MANY" "$MANY"

say "registry in memory: --lazy and eager, 1 and $MANY connections, alternating"
registry_into_memory
for round in 1 2; do
  lazy_with "mem_lazy_c1_r$round" 1
  lazy_with "mem_lazy_c${MANY}_r$round" "$MANY"
done
eager_with mem_eager_c1 1
eager_with "mem_eager_c$MANY" "$MANY"
say "done"
cat "$OUT/summary.env"
