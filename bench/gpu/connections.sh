#!/usr/bin/env bash
# How many chunk fetches a restore keeps in flight, and over how many connections, side
# by side in one run on the GPU machine: snapctl --chunk-connections (1 against $MANY,
# through SNAPCTL_CHUNK_CONNECTIONS) and --fetch-memory (the scheduler's budget: 64M is
# 32 fetches of 2 MiB chunks, $BIG more, through SNAPCTL_FETCH_MEMORY). The medium
# preset's transparent `checkpoint --cuda` snapshot, restored with `pull-restore --lazy`
# (the fill fetches 3.56 GB of device memory first) and eagerly, every restore into an
# empty node cache with the page cache dropped. First from the registry on disk, then
# from the registry in memory (registry_into_memory), where the fetch stack is what
# limits the fill. The local `criu restore` from /dev/shm + CUDA restore is the
# baseline. Needs what separated.sh needs; results (summary.env, restores.jsonl,
# rs-*.json, run.log) go to $OUT.
#   PRESET=medium DEADLINE=555 OUT=/tmp/conn bash bench/gpu/connections.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/snapreg-conn}" W=/var/tmp/snapreg-conn
. bench/gpu/common.sh
A=/tmp/ctl-a
REF="hf/$PRESET:transparent"
MANY="${MANY:-4}" BIG="${BIG:-256M}"
lazy_with() { # NAME CONNECTIONS FETCH_MEMORY
  SNAPCTL_CHUNK_CONNECTIONS=$2 SNAPCTL_FETCH_MEMORY=$3 lazy_restore "$1" "$A" "$A.log.ck" "$W/cache-$1" "$REF"
  rm -rf "$W/cache-$1"
}
eager_with() { # NAME CONNECTIONS FETCH_MEMORY
  SNAPCTL_CHUNK_CONNECTIONS=$2 SNAPCTL_FETCH_MEMORY=$3 timed_restore "$1" "$A" "$A.log.ck" "$W/cache-$1" "$REF"
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

say "registry on disk: --lazy, 1 connection and 64M, then $MANY and $BIG"
lazy_with disk_lazy_c1_m64 1 64M
lazy_with "disk_lazy_c${MANY}_m$BIG" "$MANY" "$BIG"

say "registry in memory: --lazy, connections x fetch memory, two rounds"
registry_into_memory
for round in 1 2; do
  lazy_with "mem_lazy_c1_m64_r$round" 1 64M
  lazy_with "mem_lazy_c${MANY}_m64_r$round" "$MANY" 64M
  lazy_with "mem_lazy_c1_m${BIG}_r$round" 1 "$BIG"
  lazy_with "mem_lazy_c${MANY}_m${BIG}_r$round" "$MANY" "$BIG"
done
say "registry in memory: eager"
eager_with mem_eager_c1_m64 1 64M
eager_with "mem_eager_c${MANY}_m$BIG" "$MANY" "$BIG"
say "done"
cat "$OUT/summary.env"
